"""Per-example gradients of trainable linear layers, computed inside the layer's own backward.

DP-SGD needs each example's gradient (to clip it). Opacus' GradSampleModule gets them from
module hooks: a forward hook keeps every hooked layer's input, a full backward hook receives the
output gradient, rescales it, computes the per-example gradient into a zeroed buffer, and
autograd still computes the usual summed weight gradient next to it. In fedtune's models every
trainable tensor is the weight or bias of a plain `nn.Linear` (LoRA's A and B, a linear head),
which makes most of that machinery overhead: on MiniLM at batch 512 the work only DP did was
about 5 % of a step, and the per-example einsums themselves a sixth of that (profile in
results/RESULTS.md).

Here each such layer runs through `_LinearGradSample`, an autograd function whose backward
returns the input gradient and stores the per-example weight and bias gradients in
`p.grad_sample` (Opacus' own formula for nn.Linear) instead of the summed gradient. That is the
contract of Opacus' "no_op" grad-sample mode, made for per-example gradients computed outside
its hooks: Opacus' DPOptimizer still clips, sums, noises and accounts them.

The backward computes the gradient of whatever is back-propagated: back-propagate the *sum* of
the per-example losses, so that `grad_sample[i]` is example i's gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def trainable_linears(model: nn.Module) -> list[nn.Linear] | None:
    """The layers holding the trainable tensors of `model`, if every one of them is the weight or
    bias of a plain nn.Linear; else None (use Opacus' hooks, which know more layer types)."""
    layers = []
    for module in model.modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if type(module) is not nn.Linear:  # a subclass may not compute F.linear
            return None
        layers.append(module)
    # Every parameter is some module's own, so these layers hold every trainable tensor (a
    # tensor shared with a non-Linear layer returned None above).
    return layers or None


class _LinearGradSample(torch.autograd.Function):
    """y = x W^T + b whose backward gives x its gradient and W, b per-example gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                layer: nn.Linear) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        if layer.weight.requires_grad:
            _accumulate(layer.weight, torch.einsum("n...i,n...j->nij", grad_out, x))
        if layer.bias is not None and layer.bias.requires_grad:
            _accumulate(layer.bias, grad_out.reshape(grad_out.shape[0], -1,
                                                     grad_out.shape[-1]).sum(dim=1))
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        # No summed gradient for W and b: DPOptimizer builds p.grad from the clipped grad_sample.
        return grad_x, None, None, None


def _accumulate(p: torch.Tensor, grad_sample: torch.Tensor) -> None:
    """A layer called twice in one pass adds both contributions, as autograd would."""
    previous = getattr(p, "grad_sample", None)
    p.grad_sample = grad_sample if previous is None else previous + grad_sample


def _forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _LinearGradSample.apply(x, layer.weight, layer.bias, layer)


@contextmanager
def linear_grad_samples(layers: list[nn.Linear]) -> Iterator[None]:
    """While open, `layers` compute per-example gradients in their backward (see module doc)."""
    for layer in layers:
        # An instance attribute shadows nn.Linear.forward; deleting it restores the class's.
        layer.forward = _forward.__get__(layer)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
