"""The causal-LM loss that applies the LM head only at labelled positions is the naive loss.

Real SmolLM2-135M (embedded, dequantized once into the fedtune cache), real PEFT LoRA, real Opacus.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine

from fedtune.common.config import LoraSettings
from fedtune.common.data import IGNORE_INDEX, PadCollator
from fedtune.common.lora import apply_lora
from fedtune.common.models import load_base_model
from fedtune.common.tasks import _lm_parts, label_token_losses, per_sample_loss


def naive_per_sample_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The former definition: full logits at every position, unlabelled ones ignored."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits.float()
    labels = batch["labels"][:, 1:]
    tok = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(labels.shape)
    return tok.sum(dim=1) / (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)


@pytest.fixture(scope="module")
def lm():
    base, tok, _ = load_base_model("smollm2-135m-instruct", "causal_lm", dtype="float32",
                                   device="cpu")
    model = apply_lora(base, "causal_lm", LoraSettings(r=4, init_seed=1))
    with torch.no_grad():  # B starts at zero; make the adapter matter
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.02)
    return model, tok


def _batch(tok) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    items = []
    # Varied prompt / answer lengths; one answer-less row (all labels ignored).
    for prompt_len, answer_len in ((9, 5), (3, 12), (14, 2), (6, 0)):
        ids = torch.randint(10, 4000, (prompt_len + answer_len,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt_len + ids[prompt_len:]})
    return PadCollator(tok.pad_token_id)(items)


def _assert_close_to_scale(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float32 rounding: the two losses sum over 49,152 logits in different orders
    (chunked vs whole), so tiny entries may differ by ~1e-6 absolute; measure that against the
    tensor's largest entry."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_fast_path_is_taken_for_smollm2(lm):
    model, tok = lm
    assert _lm_parts(model) is not None
    # and its frozen, tied LM head goes through the chunked cross-entropy (common/head_loss.py)
    losses, _, _ = label_token_losses(model, _batch(tok))
    assert type(losses.grad_fn).__name__ == "_FrozenHeadCrossEntropyBackward"


def test_loss_and_lora_gradients_equal_the_naive_ones(lm):
    model, tok = lm
    batch = _batch(tok)
    params = [p for p in model.parameters() if p.requires_grad]

    fast = per_sample_loss(model, batch, "causal_lm")
    fast_grads = torch.autograd.grad(fast.mean(), params)
    naive = naive_per_sample_loss(model, batch)
    naive_grads = torch.autograd.grad(naive.mean(), params)

    assert fast.shape == (4,) and float(fast[3]) == 0.0  # no labelled token: zero loss
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_grads, naive_grads, strict=True):
        _assert_close_to_scale(a, b)


def test_opacus_per_sample_gradients_equal_the_naive_ones(lm):
    model, tok = lm
    batch = _batch(tok)
    params = [p for p in model.parameters() if p.requires_grad]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4)),
                                         batch_size=4)
    opt = torch.optim.SGD(params, lr=0.0)
    gsm, opt, _ = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=1e6,
        poisson_sampling=False,
    )
    try:
        per_sample_loss(gsm, batch, "causal_lm").mean().backward()
        fast = [p.grad_sample.clone() for p in params]
        opt.zero_grad(set_to_none=True)
        naive_per_sample_loss(gsm, batch).mean().backward()
        naive = [p.grad_sample.clone() for p in params]
        for a, b in zip(fast, naive, strict=True):
            assert a.shape[0] == 4
            _assert_close_to_scale(a, b)
    finally:
        gsm._close()
        for p in params:
            p.grad_sample = None
            p.grad = None
