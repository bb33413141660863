"""Per-example clipping is float32 whatever the training dtype: on a bfloat16 model (the CUDA
default), removing any one example moves the clipped sum by at most C.

Real MiniLM (embedded), real PEFT LoRA cast to bfloat16, fedtune's per-example gradients
(client/linear_grad_sample.py), real Opacus DPOptimizer. No mocks.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer

from fedtune.client.fp32_clip import Fp32ClipDPOptimizer
from fedtune.client.linear_grad_sample import linear_grad_samples, trainable_linears
from fedtune.client.trainer import train_local
from fedtune.common.config import DPConfig, LoraSettings, TrainConfig
from fedtune.common.data import EncodedDataset, PadCollator
from fedtune.common.lora import apply_lora, get_adapter, set_adapter
from fedtune.common.models import load_base_model
from fedtune.common.tasks import per_sample_loss

N = 12  # examples in the batch D


@pytest.fixture(scope="module")
def bf16_minilm():
    base, tok, _ = load_base_model("all-minilm-l6-v2", "classification", num_labels=4,
                                   dtype="bfloat16", device="cpu")
    model = apply_lora(base, "classification", LoraSettings(r=4, init_seed=3))
    model.to(torch.bfloat16)  # PEFT keeps LoRA in float32; here every trainable tensor is bf16
    with torch.no_grad():  # B starts at zero, which would leave A without gradient
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    return model, tok


def _items(tok, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "card lost balance transfer abroad pin reset stolen savings fee limit refund".split()
    return [{"input_ids": tok(" ".join(rng.choices(words, k=rng.randint(2, 12))))["input_ids"],
             "labels": rng.randrange(4)} for _ in range(n)]


@pytest.fixture(scope="module")
def grads(bf16_minilm) -> list[torch.Tensor]:
    return _per_example_grads(*bf16_minilm)


def _per_example_grads(model, tok) -> list[torch.Tensor]:
    """Each trainable tensor's per-example gradients [N, ...] (bf16), fedtune's own backward."""
    batch = PadCollator(tok.pad_token_id)(_items(tok, N))
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    torch.manual_seed(0)
    with linear_grad_samples(trainable_linears(model)):
        per_sample_loss(model, batch, "classification").sum().backward()
    grads = [p.grad_sample.detach().clone() for p in params]
    for p in params:
        p.grad = p.grad_sample = None
    return grads


def _clipped_sum(opt: DPOptimizer, grads: list[torch.Tensor], keep: torch.Tensor
                 ) -> torch.Tensor:
    """The optimizer's clipped sum over the examples in `keep`, flattened, in float64."""
    for p, g in zip(opt.params, grads, strict=True):
        p.grad_sample, p.summed_grad = g[keep], None
    opt.clip_and_accumulate()
    out = torch.cat([p.summed_grad.double().flatten() for p in opt.params])
    for p in opt.params:
        p.grad_sample = p.summed_grad = None
    return out


def _sensitivity(opt: DPOptimizer, grads: list[torch.Tensor]) -> float:
    """max_i ||S(D) - S(D minus i)||: how far removing one example moves the clipped sum."""
    full = _clipped_sum(opt, grads, torch.ones(N, dtype=torch.bool))
    worst = 0.0
    for i in range(N):
        keep = torch.ones(N, dtype=torch.bool)
        keep[i] = False
        worst = max(worst, float((full - _clipped_sum(opt, grads, keep)).norm()))
    return worst


def _optimizer(model, clip: float) -> DPOptimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0,
                       max_grad_norm=clip, expected_batch_size=N)


def _norms(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.double().reshape(N, -1).norm(dim=1) for g in grads], 1).norm(dim=1)


@pytest.mark.parametrize("scale", [0.01, 0.3, 0.97])
def test_bf16_sensitivity_of_the_clipped_sum_is_at_most_c(bf16_minilm, grads, scale):
    """C below every example's norm (all clipped) or between them (some clipped)."""
    model, _ = bf16_minilm
    norms = _norms(grads)
    clip = float(norms.min()) * scale if scale < 0.5 else float(norms.median()) * scale
    opt = Fp32ClipDPOptimizer.replacing(_optimizer(model, clip), None)
    assert _sensitivity(opt, grads) <= clip * (1 + 1e-5)
    # The float32 sum is exactly the sum of per-example contributions min(1, C/||g||) g.
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = torch.cat([torch.einsum("i,i...", factors, g.double()).flatten() for g in grads])
    got = _clipped_sum(opt, grads, torch.ones(N, dtype=torch.bool))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * clip)


def test_opacus_own_bf16_clipping_exceeds_c(bf16_minilm, grads):
    """Why: Opacus' clipping in the parameters' bf16 lets one example move the sum by > C."""
    model, _ = bf16_minilm
    clip = float(_norms(grads).min()) * 0.01
    worst = max(_sensitivity(_optimizer(model, c), grads) / c
                for c in (clip, clip * 1.37, clip * 2.11, clip * 3.3))
    assert worst > 1 + 1e-3


def test_dp_training_of_a_bf16_model_steps_in_bf16(bf16_minilm):
    """train_local on the bf16 model: the float32 noised sum is cast back for the step."""
    model, tok = bf16_minilm
    start = get_adapter(model)
    dp = DPConfig(enabled=True, max_grad_norm=0.1, noise_multiplier=1.0, target_epsilon=None)
    try:
        result = train_local(model, EncodedDataset(_items(tok, 24, seed=2)),
                             task="classification", pad_id=tok.pad_token_id,
                             device=torch.device("cpu"),
                             train=TrainConfig(batch_size=8, lr=0.1, optimizer="sgd"), dp=dp,
                             noise_multiplier=1.0, steps=2)
        moved = [float(np.abs(a - b).max()) for a, b in zip(get_adapter(model), start,
                                                             strict=True)]
    finally:
        set_adapter(model, start)
    assert result.steps == 2 and all(m > 0 for m in moved)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
