"""Cross-entropy of a frozen LM head, computed in row chunks without a full logits tensor.

The plain path, `F.cross_entropy(lm_head(hidden).float(), labels)`, materialises N x vocabulary
logits, their log-softmax, and in the backward pass a zero-filled gradient of that size and the
softmax gradient: four tensors of N x 49,152 floats for SmolLM2 (82 MB each at N = 420). On a
CPU each such allocation is a fresh `mmap` whose pages fault in one by one, and the profile of a
SmolLM2 training pass put ~10 % of it in `log_softmax` and its backward, memory traffic rather
than arithmetic.

Here the loss and its gradient with respect to the hidden states are computed together in the
forward pass, a chunk of rows at a time, in two buffers reused for every chunk: logits, then
log-softmax (the loss), then softmax - one-hot (d loss / d logits), then times the head's weight
(d loss / d hidden). Backward only scales that saved N x hidden gradient by the incoming one.
The same idea as Liger-Kernel's fused linear cross-entropy (Hsu et al., 2024,
arXiv:2410.10989). The head's weight must be frozen (LoRA does not train it): no gradient is
computed for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows per chunk: 128 x 49,152 float logits are 25 MB, under glibc's 32 MB ceiling for serving
# a block from reused heap memory rather than a fresh mmap; of 16 to 420 rows, 128 was the fastest
# for SmolLM2's head on this project's CPU (fewer rows re-read the 113 MB weight more often).
ROWS_PER_CHUNK = 128


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                rows: int) -> torch.Tensor:
        n, vocab, dev = hidden.shape[0], weight.shape[0], hidden.device
        losses = torch.empty(n, dtype=torch.float32, device=dev)
        grad = torch.empty(hidden.shape, dtype=torch.float32, device=dev) \
            if ctx.needs_input_grad[0] else None
        logits = torch.empty(min(rows, n), vocab, dtype=hidden.dtype, device=dev)
        logp = torch.empty(min(rows, n), vocab, dtype=torch.float32, device=dev)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            k, y = stop - start, labels[start:stop]
            lg, lp, picked = logits[:k], logp[:k], torch.arange(k, device=dev)
            torch.mm(hidden[start:stop], weight.t(), out=lg)
            torch.log_softmax(lg.float(), dim=-1, out=lp)  # .float(): no copy when float32
            losses[start:stop] = -lp[picked, y]
            if grad is not None:
                lp.exp_()                # softmax
                lp[picked, y] -= 1.0     # d loss / d logits
                if hidden.dtype == torch.float32:
                    torch.mm(lp, weight, out=grad[start:stop])
                else:
                    grad[start:stop] = lp.to(hidden.dtype) @ weight
        ctx.hidden_dtype = hidden.dtype
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * g.unsqueeze(1)).to(ctx.hidden_dtype), None, None, None


def is_frozen_linear_head(head: torch.nn.Module) -> bool:
    """Whether `frozen_head_cross_entropy` applies: a plain, bias-free nn.Linear, weight frozen."""
    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad


def frozen_head_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor,
                              rows: int = ROWS_PER_CHUNK) -> torch.Tensor:
    """Per-row cross-entropy of `head(hidden)` against `labels` (shape [N]), as float32.

    Equal to `F.cross_entropy(head(hidden).float(), labels, reduction="none")`, for a bias-free
    head whose weight does not require a gradient, and labels that are all token ids (ignored
    positions already removed: there is no ignore_index). All three are checked.
    """
    if not is_frozen_linear_head(head):
        raise ValueError("frozen_head_cross_entropy needs a plain, bias-free nn.Linear head "
                         "with a frozen weight")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("frozen_head_cross_entropy: negative label (an ignore_index?); pass only "
                         "the labelled positions")
    if hidden.shape[0] == 0:  # no labelled token in the batch
        return F.cross_entropy(head(hidden).float(), labels, reduction="none")
    return _FrozenHeadCrossEntropy.apply(hidden, head.weight, labels, rows)
