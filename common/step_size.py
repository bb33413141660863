"""`train.lr = "auto"`: the sites' AdamW step size from the run's length, chosen without data.

AdamW divides each coordinate of the gradient by its running RMS, so a step moves every
trainable weight by about `lr` whatever the gradient's size; what differs is whether successive
steps agree. Over T = rounds x local_steps steps:

- **With DP**, the RMS is mostly the noise's own scale (sigma*C/B per coordinate), so the steps
  are mostly noise: they add up like a random walk, about lr * sqrt(T) per weight, while the
  signal's share adds up like lr * T. `lr = TRAVEL / sqrt(T)` fixes how far the noise alone
  pushes each weight over the whole run, however many steps it has, so a longer run only adds
  signal; a fixed step size lets the noise's reach grow with sqrt(T) until it swamps what was
  learnt.
- **Without DP** the steps agree (each moves a weight the same way), so they add up like
  lr * T; `lr = TRAVEL / T` bounds that distance instead. The DP rule's step size there moved a
  classification head far enough in 12 steps to send a long-text classifier's loss from 0.84
  to 2.4 (results/recipes.md), which the DP run's noise had kept from happening.
  A run shorter than MIN_STEPS steps is counted as MIN_STEPS: AdamW's first steps are sign
  steps (its moment estimates start at the first gradient), each moving every weight by the
  full lr in the gradient's direction, and a 2-step run has no later step to undo an overshoot.
  At 2 steps (lr 0.025 per step) the no-DP rows of the MedQuAD quick benchmark ended far above
  the base model (held-out loss 3.0 -> 3.7 federated, 6.3 centralized); at 4 steps they
  trained. That threshold was seen on those records, in runs without DP, and it touches only
  the no-DP form.

TRAVEL = 0.05 comes from the scale of the trained weights, not from anyone's records: LoRA's A
starts with entries of about 1/sqrt(fan_in) (0.04 to 0.05 for MiniLM and SmolLM2), so the noise
moves a weight by about its own initial size at most; a head on a mean-pooled vector of norm
|x| sees logits move by ~0.05 |x| through noise. results/recipes.md measures the rule on the
three embedded cases (public or generated data), DP on and off.

With FedAvgM the server's momentum multiplies the sites' steady step by 1/(1 - beta), so the
rule lowers the sites' step by (1 - beta), as that strategy's docstring asks.
"""

from __future__ import annotations

import math

TRAVEL = 0.05
MIN_STEPS = 4  # without DP, shorter runs get the step size of a 4-step run


def auto_lr(rounds: int, local_steps: int, *, dp: bool = True,
            server_momentum: float | None = None) -> float:
    """The AdamW step size of `train.lr = "auto"` for a run of rounds x local_steps steps, with
    DP on or off; `server_momentum`: FedAvgM's beta (None for strategies without it)."""
    steps = rounds * local_steps
    lr = TRAVEL / (math.sqrt(steps) if dp else max(steps, MIN_STEPS))
    return lr * (1 - server_momentum) if server_momentum is not None else lr


def auto_lr_formula(rounds: int, local_steps: int, *, dp: bool = True,
                    server_momentum: float | None = None) -> str:
    """`auto_lr`'s formula for this run, as the run header prints it."""
    steps = f"{rounds} rounds x {local_steps} steps"
    if not dp and rounds * local_steps < MIN_STEPS:
        steps = f"at least {MIN_STEPS} steps"
    return (f"{TRAVEL:g} / " + (f"sqrt({steps})" if dp else f"({steps})")
            + (f" x (1 - {server_momentum:g})" if server_momentum is not None else ""))
