"""Warnings about training settings that are known to go wrong, before anything trains.

Each rule is stated where it is checked, so the warning can say what to change and why:

- AdamW moves every trainable weight by about its step size per step, whatever the gradient's
  size (it divides by the gradient's running RMS). Step sizes that work for LoRA with AdamW lie
  around 1e-4 to 1e-2; above 0.05 a few steps take the adapter or head far from the pretrained
  model (on a long-text set, AdamW with head_lr = 5 sent the loss to 8).
- Plain SGD moves a weight by lr x gradient. Every step's gradient has norm at most
  `dp.max_grad_norm` (C), with DP on (clipped per record) or off (clipped as a whole), so one
  step moves the trainable weights by at most lr x C, plus the DP noise.
- FedAvgM's buffer m_k = beta m_(k-1) + delta_k builds up over about 1/(1-beta) rounds: in
  round k a steady delta moves the adapter by (1 - beta^k)/(1 - beta) times FedAvg's step. With
  the sites' step sizes lowered by (1 - beta) to match FedAvg at steady state (the strategy's
  rule), a run of R rounds moves on average sum_k (1 - beta^k) / R of FedAvg's distance: 36 %
  in 8 rounds at beta = 0.9, close to nothing in the first rounds.
"""

from __future__ import annotations

from fedtune.common.config import RunConfig, auto_lr_inputs
from fedtune.common.step_size import auto_lr_formula

ADAMW_MAX_LR = 0.05


def momentum_ramp(beta: float, rounds: int) -> float:
    """Mean fraction of its steady step that a momentum-beta buffer takes over `rounds`."""
    return sum(1 - beta**k for k in range(1, rounds + 1)) / rounds


def train_line(cfg: RunConfig) -> str:
    """The run header's training line: optimizer, step sizes (and the rule behind an "auto"
    one), expected batch."""
    t = cfg.train
    lr = f"lr {t.lr:.3g}"
    if t.lr_rule == "auto":
        lr += f" (auto: {auto_lr_formula(**auto_lr_inputs(cfg))})"
    head = f", head lr {t.head_lr:.3g}" if t.head_lr is not None else ""
    return f"training: {t.optimizer}, {lr}{head}, expected batch {t.batch_size} per site"


def recipe_warnings(cfg: RunConfig) -> list[str]:
    """Plain-language warnings, each naming the key to change."""
    out = []
    t = cfg.train
    if t.optimizer == "adamw":
        for key, lr in (("train.lr", t.lr), ("train.head_lr", t.head_lr)):
            if lr is not None and lr > ADAMW_MAX_LR:
                out.append(
                    f"{key} = {lr:g} with AdamW: AdamW moves every weight by about its step "
                    f"size per step whatever the gradient, so anything above {ADAMW_MAX_LR:g} "
                    "takes the model far from where it started within a few steps (typical: "
                    "1e-4 to 1e-2). Large step sizes belong to train.optimizer = \"sgd\" "
                    "(docs/privacy.md, \"Getting accuracy out of a budget\").")
    fed = cfg.federation
    if fed.strategy == "fedavgm":
        ramp = momentum_ramp(fed.server_momentum, fed.rounds)
        if ramp < 0.5:
            out.append(
                f"federation.strategy = \"fedavgm\" with server_momentum = "
                f"{fed.server_momentum:g} over {fed.rounds} rounds: the momentum buffer takes "
                f"about {1 / (1 - fed.server_momentum):.0f} rounds to build up, and its steps "
                f"average {ramp:.0%} of their steady size in this run. With the sites' step "
                "sizes lowered by (1 - momentum), the adapter moves only that fraction of "
                "FedAvg's distance. Use more rounds, a smaller server_momentum, or fedavg.")
    return out
