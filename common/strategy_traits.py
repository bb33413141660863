"""What each aggregation strategy implies for the rest of the system, in one table.

The classes live in server/strategy/ (one file per method, with its paper); the configuration
checks and the site's trainer need only these traits, so they do not import the server.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StrategyTraits:
    # Trains and sends only LoRA's B; A stays at its seeded random init (FFA-LoRA).
    frozen_a: bool = False
    # The aggregate is the example-weighted mean of the site updates: what site-level central
    # DP noise is calibrated to.
    mean_aggregate: bool = False
    # Needs each site's plain B and A (multiplies them), so it cannot run under SecAgg+.
    needs_plain_updates: bool = False


STRATEGY_TRAITS: dict[str, StrategyTraits] = {
    "fedavg": StrategyTraits(mean_aggregate=True),
    "fedavgm": StrategyTraits(),
    "fedprox": StrategyTraits(mean_aggregate=True),
    "fedadam": StrategyTraits(),
    "fedyogi": StrategyTraits(),
    "ffa_lora": StrategyTraits(frozen_a=True, mean_aggregate=True),
    "product_svd": StrategyTraits(needs_plain_updates=True),
}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGY_TRAITS)
