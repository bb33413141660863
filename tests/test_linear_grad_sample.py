"""fedtune's own per-example gradients (client/linear_grad_sample.py) are Opacus' per-example
gradients, and DP training with them is DP training with Opacus' hooks.

Real MiniLM and SmolLM2-135M (embedded), real PEFT LoRA, real Opacus.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine

from fedtune.client.linear_grad_sample import linear_grad_samples, trainable_linears
from fedtune.client.trainer import train_local
from fedtune.common.config import DPConfig, LoraSettings, TrainConfig
from fedtune.common.data import IGNORE_INDEX, EncodedDataset, PadCollator
from fedtune.common.lora import apply_lora, get_adapter, set_adapter
from fedtune.common.models import load_base_model
from fedtune.common.tasks import per_sample_loss


def _lora(name: str, task: str, **kw):
    base, tok, _ = load_base_model(name, task, dtype="float32", device="cpu", **kw)
    model = apply_lora(base, task, LoraSettings(r=4, init_seed=5))
    with torch.no_grad():  # B starts at zero, which would leave A without gradient
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    return model, tok


@pytest.fixture(scope="module")
def minilm():
    return _lora("all-minilm-l6-v2", "classification", num_labels=4)


@pytest.fixture(scope="module")
def smollm2():
    return _lora("smollm2-135m-instruct", "causal_lm")


def _classification_items(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(1000, 2000) for _ in range(rng.randint(3, 30))],
             "labels": rng.randrange(4)} for _ in range(n)]


def _lm_items(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        prompt, answer = rng.randint(2, 12), rng.randint(0, 10)
        ids = [rng.randrange(10, 4000) for _ in range(prompt + answer)]
        items.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return items


def _opacus_grad_samples(model, batch, task) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(1)))
    gsm, _, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(params, lr=0.0), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False,
    )
    try:
        torch.manual_seed(0)  # the same dropout masks in both
        per_sample_loss(gsm, batch, task).mean().backward()  # Opacus undoes the mean
        return [p.grad_sample.clone() for p in params]
    finally:
        gsm._close()
        for p in params:
            p.grad = p.grad_sample = None


@pytest.mark.parametrize(("fixture", "task", "items"), [
    ("minilm", "classification", _classification_items),
    ("smollm2", "causal_lm", _lm_items),
])
def test_per_example_gradients_equal_opacus_hooks(request, fixture, task, items):
    model, tok = request.getfixturevalue(fixture)
    batch = PadCollator(tok.pad_token_id)(items(6))
    params = [p for p in model.parameters() if p.requires_grad]
    expected = _opacus_grad_samples(model, batch, task)

    layers = trainable_linears(model)
    assert layers is not None
    if task == "classification":  # the head's weight and bias are in it too
        assert any(layer.bias is not None and layer.bias.requires_grad for layer in layers)
    try:
        with linear_grad_samples(layers):
            torch.manual_seed(0)
            per_sample_loss(model, batch, task).sum().backward()
        got = [p.grad_sample for p in params]
        # Each trainable tensor gets its 6 per-example gradients, and no summed gradient.
        assert all(p.grad is None for p in params)
        assert any(float(g.abs().max()) > 0 for g in got)
        for g, e in zip(got, expected, strict=True):
            assert g.shape == e.shape and g.shape[0] == 6
            # Float rounding only (Opacus scales a mean back up; here the sum is differentiated).
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))
    finally:
        for p in params:
            p.grad = p.grad_sample = None
    assert all("forward" not in layer.__dict__ for layer in layers)  # nn.Linear's forward again


def test_the_layers_forward_is_restored_after_an_error(minilm):
    model, _ = minilm
    layers = trainable_linears(model)
    with pytest.raises(RuntimeError, match="broke"), linear_grad_samples(layers):
        assert all("forward" in layer.__dict__ for layer in layers)
        raise RuntimeError("broke")
    assert all("forward" not in layer.__dict__ for layer in layers)


def test_dp_training_equals_training_with_opacus_hooks(minilm):
    """Same seed, same Poisson batches, dropout masks and noise: the same adapter, whichever
    path computes the per-example gradients. Every example is clipped (small bound)."""
    model, tok = minilm
    data = EncodedDataset(_classification_items(48, seed=1))
    start = get_adapter(model)
    dp = DPConfig(enabled=True, max_grad_norm=0.05, noise_multiplier=0.3, target_epsilon=None)
    train = TrainConfig(batch_size=16, lr=0.5, optimizer="sgd", chunk_tokens=60)
    results, adapters = [], []
    try:
        for mode in ("auto", "hooks"):
            set_adapter(model, start)
            torch.manual_seed(11)
            results.append(train_local(model, data, task="classification",
                                       pad_id=tok.pad_token_id, device=torch.device("cpu"),
                                       train=train, dp=dp, noise_multiplier=0.3, steps=3,
                                       seed=7, grad_sample_mode=mode))
            adapters.append(get_adapter(model))
    finally:
        set_adapter(model, start)
    own, hooks = results
    assert own.examples_seen == hooks.examples_seen > 0
    assert own.mean_loss == pytest.approx(hooks.mean_loss, rel=1e-5)
    moved = max(float(np.abs(a - s).max()) for a, s in zip(adapters[0], start, strict=True))
    assert moved > 1e-4
    for a, b in zip(*adapters, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_other_trainable_layers_are_left_to_opacus_hooks():
    linear = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    assert trainable_linears(linear) == list(linear)
    with_norm = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    assert trainable_linears(with_norm) is None
    frozen_norm = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    frozen_norm[1].requires_grad_(False)
    assert trainable_linears(frozen_norm) == [frozen_norm[0]]
    assert trainable_linears(torch.nn.Sequential(torch.nn.Linear(4, 3)).requires_grad_(False)) \
        is None
