"""The chunked cross-entropy of a frozen LM head equals the plain one (loss and gradient)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedtune.common.head_loss import frozen_head_cross_entropy


def _head(d: int, vocab: int, dtype: torch.dtype = torch.float32) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(d, vocab, bias=False).to(dtype)
    head.weight.requires_grad_(False)
    return head


@pytest.mark.parametrize("rows", [3, 4, 64])  # several chunks with a partial last one; one chunk
def test_losses_and_hidden_gradient_equal_plain_cross_entropy(rows):
    head = _head(16, 50)
    hidden = torch.randn(10, 16, requires_grad=True)
    labels = torch.randint(0, 50, (10,))
    weights = torch.rand(10)  # a non-uniform upstream gradient, as per-example losses get

    fused = frozen_head_cross_entropy(hidden, head, labels, rows=rows)
    (g_fused,) = torch.autograd.grad((fused * weights).sum(), hidden)
    plain = F.cross_entropy(head(hidden).float(), labels, reduction="none")
    (g_plain,) = torch.autograd.grad((plain * weights).sum(), hidden)

    assert fused.dtype == torch.float32 and fused.shape == (10,)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-7)


def test_bfloat16_model_gives_float32_losses_and_bfloat16_gradient():
    head = _head(16, 50, torch.bfloat16)
    hidden = torch.randn(7, 16, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 50, (7,))
    fused = frozen_head_cross_entropy(hidden, head, labels, rows=3)
    fused.sum().backward()
    plain = F.cross_entropy(head(hidden).float(), labels, reduction="none")
    assert fused.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(fused, plain, rtol=2e-2, atol=2e-2)


def test_no_grad_and_empty_inputs():
    head = _head(8, 20)
    labels = torch.randint(0, 20, (5,))
    hidden = torch.randn(5, 8)
    with torch.no_grad():
        fused = frozen_head_cross_entropy(hidden, head, labels, rows=2)
    torch.testing.assert_close(fused, F.cross_entropy(head(hidden), labels, reduction="none"))
    empty = frozen_head_cross_entropy(torch.zeros(0, 8, requires_grad=True), head,
                                      labels[:0])
    assert empty.shape == (0,)


def test_refuses_a_trainable_or_biased_head():
    trainable = torch.nn.Linear(8, 20, bias=False)
    with pytest.raises(ValueError, match="frozen weight"):
        frozen_head_cross_entropy(torch.randn(2, 8), trainable, torch.tensor([1, 2]))
    biased = torch.nn.Linear(8, 20)
    biased.requires_grad_(False)
    with pytest.raises(ValueError, match="bias-free"):
        frozen_head_cross_entropy(torch.randn(2, 8), biased, torch.tensor([1, 2]))


def test_refuses_an_ignore_index_label():
    head = _head(8, 20)
    with pytest.raises(ValueError, match="negative label"):
        frozen_head_cross_entropy(torch.randn(2, 8), head, torch.tensor([1, -100]))
