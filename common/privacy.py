"""Privacy accounting helpers on top of Opacus' accountants (RDP and PRV).

A site's mechanism is a history of (noise_multiplier, sample_rate, steps) entries: Poisson-sampled
Gaussian mechanism steps. Composing the whole history gives the site's epsilon at a given delta.
"""

from __future__ import annotations

from collections.abc import Sequence

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

Mechanism = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


class PrivacyBudgetError(ValueError):
    """A privacy parameter is impossible or a budget cannot be met."""


def check_delta(delta: float, records: int, where: str = "") -> None:
    """delta must be below 1/records: otherwise the guarantee allows leaking a whole record."""
    if records <= 0:
        raise PrivacyBudgetError(f"{where}no records")
    if delta >= 1.0 / records:
        raise PrivacyBudgetError(
            f"{where}dp.delta = {delta:g} is not below "
            f"1/records = 1/{records} = {1 / records:.3g}; "
            f"choose dp.delta < {1 / records:.3g} (e.g. {10 ** -(len(str(records)) + 1):g})"
        )


def epsilon(history: Sequence[Mechanism], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of the composition of all mechanisms in `history` (0 if empty)."""
    steps = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not steps:
        return 0.0
    if any(s == 0 for s, _, _ in steps):
        return float("inf")
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = list(steps)
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """Smallest noise multiplier whose `steps` Poisson-Gaussian steps stay <= target_epsilon."""
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )
    except ValueError as e:
        raise PrivacyBudgetError(
            f"cannot reach epsilon {target_epsilon} with {steps} steps at sample rate "
            f"{sample_rate:.4g}: {e}"
        ) from None
