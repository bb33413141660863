"""A DP-SGD step with real Opacus on the real PEFT model clips every per-sample gradient."""

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine

from fedtune.common.config import LoraSettings
from fedtune.common.data import PadCollator
from fedtune.common.lora import apply_lora
from fedtune.common.models import load_base_model
from fedtune.common.tasks import per_sample_loss


@pytest.fixture(scope="module")
def cls_model():
    base, tok, dev = load_base_model("all-minilm-l6-v2", "classification", num_labels=4)
    model = apply_lora(base, "classification", LoraSettings(r=4))
    return model, tok


def _batch(tok, n=6):
    texts = ["I lost my card", "what is my balance", "send money abroad", "reset my PIN",
             "card stolen yesterday", "how much is in savings"][:n]
    items = [{"input_ids": tok(t)["input_ids"], "labels": i % 4} for i, t in enumerate(texts)]
    return PadCollator(tok.pad_token_id)(items)


def test_per_sample_gradients_are_clipped_before_noise(cls_model):
    model, tok = cls_model
    torch.manual_seed(0)
    C = 0.01  # small enough that every example's gradient needs clipping
    params = [p for p in model.parameters() if p.requires_grad]
    assert any("classifier" in n for n, p in model.named_parameters() if p.requires_grad)
    ds = torch.utils.data.TensorDataset(torch.zeros(6))  # only sizes the loader
    loader = torch.utils.data.DataLoader(ds, batch_size=6)
    opt = torch.optim.SGD(params, lr=0.0)
    gsm, opt, _ = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=C,
        poisson_sampling=False,
    )
    try:
        batch = _batch(tok)
        per_sample_loss(gsm, batch, "classification").mean().backward()
        # Every trainable tensor, the classifier head included, has a per-sample gradient.
        assert all(p.grad_sample is not None and p.grad_sample.shape[0] == 6 for p in params)
        norms = torch.stack(
            [p.grad_sample.reshape(6, -1).norm(dim=1) for p in params], dim=1
        ).norm(dim=1)
        assert (norms > C).all(), "test needs raw per-sample norms above C"
        factors = (C / (norms + 1e-6)).clamp(max=1.0)
        expected = [torch.einsum("i,i...->...", factors, p.grad_sample) for p in params]
        opt.pre_step()  # Opacus: clip per sample, sum, add noise (sigma = 0 here), scale
        for p, e in zip(params, expected, strict=True):
            np.testing.assert_allclose(p.grad * 6, e, rtol=1e-4, atol=1e-9)
        # The clipped per-sample contributions have norm <= C.
        assert ((factors * norms) <= C * (1 + 1e-4)).all()
    finally:
        gsm._close()
        for p in params:
            p.grad = None
            p.grad_sample = None


def test_noise_is_added_with_the_configured_scale(cls_model):
    model, tok = cls_model
    torch.manual_seed(1)
    C, sigma = 1.0, 2.0
    params = [p for p in model.parameters() if p.requires_grad]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(6)),
                                         batch_size=6)
    opt = torch.optim.SGD(params, lr=0.0)
    gsm, opt, _ = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma, max_grad_norm=C,
        poisson_sampling=False,
    )
    try:
        per_sample_loss(gsm, _batch(tok), "classification").mean().backward()
        clipped_sum_norm_bound = 6 * C
        opt.pre_step()
        flat = torch.cat([p.grad.reshape(-1) for p in params]) * 6  # undo the 1/B scaling
        noise_std = flat.std().item()
        # Noise N(0, (sigma C)^2) per coordinate dominates the (bounded) clipped sum.
        assert 0.8 * sigma * C < noise_std < 1.2 * sigma * C
        assert flat.norm().item() > clipped_sum_norm_bound
    finally:
        gsm._close()
        for p in params:
            p.grad = None
            p.grad_sample = None


def test_training_survives_empty_poisson_batches():
    """At sample rate 1/200 about a third of Poisson batches are empty, the first one included."""
    from fedtune.client.trainer import train_local
    from fedtune.common.config import load_config
    from fedtune.common.data import EncodedDataset
    from fedtune.common.lora import get_adapter, set_adapter
    from fedtune.common.model_cache import get_runtime

    cfg = load_config(None, ["model.name=all-minilm-l6-v2", "data.labels=['a', 'b']",
                             "train.batch_size=1"])
    rt = get_runtime(cfg, "classification", 2)
    ds = EncodedDataset([{"input_ids": rt.tokenizer(f"text {i}")["input_ids"], "labels": i % 2}
                         for i in range(200)])
    before = get_adapter(rt.model)
    try:
        result = train_local(rt.model, ds, task="classification", pad_id=rt.pad_id,
                             device=rt.device, train=cfg.train, dp=cfg.dp, noise_multiplier=1.0,
                             steps=20, seed=0)
        assert result.sample_rate == 1 / 200
        assert result.empty_steps > 0  # P(no empty batch in 20 steps) ~ 1e-4
        assert result.examples_seen > 0
        after = get_adapter(rt.model)
        assert all(np.abs(a - b).sum() > 0 for a, b in zip(after, before, strict=True))
    finally:
        set_adapter(rt.model, before)  # the model is cached per process: leave it as found


@pytest.mark.parametrize("head_lr", [None, 1.0])
def test_head_lr_sets_the_step_size_of_the_head_apart_from_lora(head_lr):
    """train.head_lr puts the classifier (PEFT modules_to_save) in its own optimizer group,
    also through Opacus' DP optimizer: LoRA keeps train.lr."""
    from fedtune.client.trainer import is_head, train_local
    from fedtune.common.config import load_config
    from fedtune.common.data import EncodedDataset
    from fedtune.common.lora import get_adapter, set_adapter, trainable_names
    from fedtune.common.model_cache import get_runtime

    cfg = load_config(None, ["model.name=all-minilm-l6-v2", "data.labels=['a', 'b']",
                             "train.batch_size=8", "train.optimizer=sgd", "train.lr=1e-4",
                             *([f"train.head_lr={head_lr}"] if head_lr else [])])
    rt = get_runtime(cfg, "classification", 2)
    ds = EncodedDataset([{"input_ids": rt.tokenizer(f"text {i}")["input_ids"], "labels": i % 2}
                         for i in range(32)])
    before = get_adapter(rt.model)
    try:
        train_local(rt.model, ds, task="classification", pad_id=rt.pad_id, device=rt.device,
                    train=cfg.train, dp=cfg.dp, noise_multiplier=1.0, steps=3, seed=0)
        moved = {n: float(np.abs(a - b).mean()) for n, a, b in
                 zip(trainable_names(rt.model), get_adapter(rt.model), before, strict=True)}
    finally:
        set_adapter(rt.model, before)
    head = np.mean([v for n, v in moved.items() if is_head(n)])
    lora_b = np.mean([v for n, v in moved.items() if "lora_B" in n])
    assert head > 0 and lora_b > 0  # both groups trained (DP noise alone moves every coordinate)
    if head_lr is None:
        assert head / lora_b < 100  # one step size: the same order per coordinate
    else:
        assert head / lora_b > 1000  # 1e4 apart
