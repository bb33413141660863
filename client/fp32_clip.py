"""Opacus' DP optimizer with per-example clipping in float32, whatever the training dtype.

Opacus computes the per-example norms, the clip factors C / (norm + 1e-6) and the clipped sum in
each parameter's own dtype. In bfloat16 (the CUDA default) a factor carries ~2**-9 relative error
and the sum is rounded again, so one example could move the sum by up to ~1.0067 C: more than
the sensitivity the noise is calibrated for. Here norms, factors and the running sum of clipped
gradients are float32; the noise is added to that float32 sum and only the noised result is cast
to the parameter's dtype (post-processing, no privacy cost).
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

CLIP_EPS = 1e-6  # Opacus' guard against a zero norm: factor = C / (norm + 1e-6), at most 1


def _wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32, or float64 if it already is (never narrower than float32)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class Fp32ClipDPOptimizer(DPOptimizer):
    """DPOptimizer whose clipping, clipped sum and noise are float32 (see module doc)."""

    @classmethod
    def replacing(cls, optimizer: DPOptimizer, generator: torch.Generator | None
                  ) -> Fp32ClipDPOptimizer:
        """The same DP optimizer (wrapped optimizer, σ, C, batch size, hook) with fp32 clipping
        and its noise drawn from `generator`."""
        if type(optimizer) is not DPOptimizer:  # per-layer, adaptive, distributed: not covered
            raise TypeError(f"fp32 clipping replaces DPOptimizer, not {type(optimizer).__name__}")
        new = cls(optimizer.original_optimizer, noise_multiplier=optimizer.noise_multiplier,
                  max_grad_norm=optimizer.max_grad_norm,
                  expected_batch_size=optimizer.expected_batch_size,
                  loss_reduction=optimizer.loss_reduction, generator=generator)
        if optimizer.step_hook is not None:
            new.attach_step_hook(optimizer.step_hook)
        return new

    def per_sample_clip_factors(self) -> torch.Tensor:
        """min(1, C / (||g_i|| + 1e-6)) for each example i of the pass, in float32."""
        samples = self.grad_samples
        n = len(samples[0])
        device = samples[0].device
        if n == 0:
            return torch.zeros((0,), device=device, dtype=torch.float32)
        norms = torch.stack([_wide(g).reshape(n, -1).norm(2, dim=-1).to(device)
                             for g in samples], dim=1).norm(2, dim=1)
        return (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)

    def clip_and_accumulate(self) -> None:
        """Add this pass's clipped per-example gradients to `p.summed_grad` (float32)."""
        factors = self.per_sample_clip_factors()
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            grad_sample = _wide(self._get_flat_grad_sample(p))
            clipped = torch.einsum("i,i...", factors.to(grad_sample), grad_sample)
            p.summed_grad = clipped if p.summed_grad is None else p.summed_grad + clipped
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        """p.grad = float32 clipped sum + N(0, (σC)²), then cast to the parameter's dtype."""
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = _generate_noise(std=self.noise_multiplier * self.max_grad_norm,
                                    reference=p.summed_grad, generator=self.generator,
                                    secure_mode=self.secure_mode)
            p.grad = (p.summed_grad + noise).view_as(p).to(p.dtype)
            _mark_as_processed(p.summed_grad)
