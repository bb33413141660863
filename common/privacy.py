"""Privacy accounting helpers on top of Opacus' accountants (RDP and PRV).

A site's mechanism is a history of (noise_multiplier, sample_rate, steps) entries: Poisson-sampled
Gaussian mechanism steps. Composing the whole history gives the site's epsilon at a given delta.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import opacus
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

from fedtune.common.atomic import atomic_write_text
from fedtune.common.models import default_cache_dir

Mechanism = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


class PrivacyBudgetError(ValueError):
    """A privacy parameter is impossible or a budget cannot be met."""


def check_delta(delta: float, records: int, where: str = "", unit: str = "records") -> None:
    """delta must be below 1/units (records, or persons at person level): otherwise the
    guarantee allows leaking a whole record (a whole person)."""
    if records <= 0:
        raise PrivacyBudgetError(f"{where}no {unit}")
    if delta >= 1.0 / records:
        raise PrivacyBudgetError(
            f"{where}dp.delta = {delta:g} is not below "
            f"1/{unit} = 1/{records} = {1 / records:.3g}; "
            f"choose dp.delta < {1 / records:.3g} (e.g. {10 ** -(len(str(records)) + 1):g})"
        )


# The DP settings a run may ask for. Below sigma = 0.1 or above a target of 1000 the guarantee says
# nothing (epsilon in the hundreds or more) while its accounting grows without bound: PRV's grid
# grows as ~1/sigma^2 (sigma = 0.001 asked for 21.7 GB and a site was killed out of memory) and
# calibrating a huge target probes ever smaller sigmas.
MIN_NOISE_MULTIPLIER = 0.1
MAX_TARGET_EPSILON = 1000.0


def check_dp_range(noise_multiplier: float | None, target_epsilon: float | None,
                   where: str = "") -> None:
    """Refuse dp.noise_multiplier below MIN_NOISE_MULTIPLIER and dp.target_epsilon above
    MAX_TARGET_EPSILON (checked before any accounting, by the CLI and by each site's plan)."""
    problems = []
    if noise_multiplier is not None and noise_multiplier < MIN_NOISE_MULTIPLIER:
        problems.append(f"dp.noise_multiplier = {noise_multiplier:g} is below "
                        f"{MIN_NOISE_MULTIPLIER:g} (allowed: dp.noise_multiplier >= "
                        f"{MIN_NOISE_MULTIPLIER:g})")
    if target_epsilon is not None and target_epsilon > MAX_TARGET_EPSILON:
        problems.append(f"dp.target_epsilon = {target_epsilon:g} is above "
                        f"{MAX_TARGET_EPSILON:g} (allowed: 0 < dp.target_epsilon <= "
                        f"{MAX_TARGET_EPSILON:g})")
    if problems:
        raise PrivacyBudgetError(
            f"{where}{'; '.join(problems)}. Such settings give no meaningful guarantee and "
            "their privacy accounting needs unbounded memory and time; for training without "
            "privacy set dp.enabled = false"
        )


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(ε, δ)-DP for one record implies (kε, k·e^((k-1)ε)·δ)-DP for any group of k records
    (group privacy: Dwork & Roth 2014, "The Algorithmic Foundations of Differential Privacy",
    §2.3, for ε; for (ε, δ) e.g. Vadhan 2017, "The Complexity of Differential Privacy", group
    privacy lemma). What a record-level guarantee gives a person with k records; δ may exceed 1
    (then it says nothing)."""
    if k <= 1:
        return epsilon, delta
    try:
        group_delta = k * math.exp((k - 1) * epsilon) * delta
    except OverflowError:
        group_delta = math.inf
    return k * epsilon, group_delta


ACCOUNTANTS = ("rdp", "prv")


def epsilon(history: Sequence[Mechanism], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of the composition of all mechanisms in `history` (0 if empty).

    RDP (Mironov 2017) is an upper bound; PRV (Gopi et al. 2021) is Opacus' numerical
    accountant, of which the upper end of its error interval is returned, so both are
    guarantees. PRV's discretisation error is kept to ~0.2% of epsilon (at least 1e-4).
    """
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in history:  # composition is commutative: merge equal mechanisms (faster PRV)
        if n > 0:
            merged[(float(s), float(q))] = merged.get((float(s), float(q)), 0) + int(n)
    return _epsilon(tuple(sorted((s, q, n) for (s, q), n in merged.items())), delta, accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon(steps: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    # Memoised: every round of every site asks for the same few compositions, and one PRV or
    # RDP evaluation costs seconds of CPU next to well under a second of local training.
    if not steps:
        return 0.0
    if any(s == 0 for s, _, _ in steps):
        return float("inf")
    if accountant == "rdp":
        rdp = RDPAccountant()
        rdp.history = list(steps)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the")  # still a bound
            return float(rdp.get_epsilon(delta=delta))
    if accountant != "prv":
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}")
    # RDP is (in practice) above PRV, so 0.2% of it keeps PRV's relative error near 0.2%.
    eps_rdp = epsilon(steps, delta, "rdp")
    eps_error = min(0.01, max(1e-4, 0.002 * eps_rdp))
    prv = PRVAccountant()
    prv.history = list(steps)
    eps_error = _bounded_prv_error(prv, delta, eps_error)
    if eps_error is None:  # even a coarse grid would not fit: RDP's bound still holds
        return eps_rdp
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # q = 1 makes Opacus' PRV take log(0) harmlessly
        try:
            return min(eps_rdp, float(prv.get_epsilon(delta=delta, eps_error=eps_error)))
        except (ValueError, MemoryError, OverflowError, RuntimeError):
            # PRV's grid cannot cover extreme mechanisms (e.g. almost no noise), nor place ε
            # on a coarsened grid ("Cannot compute epsilon"): RDP's bound still holds, so
            # report it rather than nothing.
            return eps_rdp


# PRV discretises the privacy loss on a grid of 2L / mesh points (Opacus' `_get_domain`): L grows
# with the mechanism's RDP epsilon (~1/sigma^2), the mesh shrinks with eps_error and sqrt(steps).
# Measured ~67 bytes per point at the peak (tracemalloc): sigma = 0.001, q = 0.2, 4 steps asks for
# 2.9e9 points, 21.7 GB. 2e6 points: ~130 MB traced, ~350 MB of resident memory.
PRV_MAX_POINTS = 2_000_000


def _bounded_prv_error(prv: PRVAccountant, delta: float, eps_error: float) -> float | None:
    """The eps_error to run `prv` with so that its grid has at most PRV_MAX_POINTS points: the
    asked one, a coarser one (a looser upper bound, still a guarantee), or None if no error
    fits (L also grows with the error)."""
    prvs = [PoissonSubsampledGaussianPRV(q, s) for s, q, _ in prv.history]
    counts = [n for _, _, n in prv.history]

    def points(err: float) -> int:
        return prv._get_domain(prvs, counts, eps_error=err, delta_error=delta / 1000).size

    n = points(eps_error)
    if n <= PRV_MAX_POINTS:
        return eps_error
    coarse = eps_error * n / PRV_MAX_POINTS * 1.01
    return coarse if points(coarse) <= PRV_MAX_POINTS else None


def epsilons(history: Sequence[Mechanism], delta: float) -> dict[str, float]:
    """Epsilon at `delta` from every accountant: {"rdp": ..., "prv": ...}."""
    return {name: epsilon(history, delta, name) for name in ACCOUNTANTS}


@functools.lru_cache(maxsize=1024)
def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """Smallest noise multiplier whose `steps` Poisson-Gaussian steps stay <= target_epsilon.

    Opacus' bisection costs seconds of CPU (~16 accountant evaluations), paid by the CLI's
    feasibility check and again by every simulation worker and site daemon at its first round.
    Its result is kept in a per-machine file (`noise_cache_file`) and reused only after one
    evaluation confirms it: epsilon within Opacus' own tolerance below the target. A damaged or
    edited entry is recomputed, never trusted.
    """
    key = json.dumps([accountant, target_epsilon, delta, sample_rate, steps])
    path = noise_cache_file()
    cached = _read_noise_cache(path).get(key)
    if isinstance(cached, float) and cached > 0:
        eps = epsilon([(cached, sample_rate, steps)], delta, accountant)
        if target_epsilon - CALIBRATION_TOLERANCE <= eps <= target_epsilon:
            return cached
    sigma = _bisect_noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant)
    with contextlib.suppress(OSError):  # a read-only cache only costs the next run time
        atomic_write_text(path, json.dumps({**_read_noise_cache(path), key: sigma}, indent=0))
    return sigma


# Opacus' get_noise_multiplier stops once epsilon is within this of the target, from below.
CALIBRATION_TOLERANCE = 0.01


def noise_cache_file() -> Path:
    # Per Opacus version: a new accountant may calibrate differently.
    return default_cache_dir() / "privacy" / f"noise-multipliers-opacus-{opacus.__version__}.json"


def _read_noise_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _bisect_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Opacus' `get_noise_multiplier` bisection (same bracket, tolerance and steps), evaluated
    with `epsilon` above, whose PRV grid is bounded: Opacus' own PRV accountant would build a
    grid of unbounded size for the small noise multipliers a large target probes. At most
    `_MAX_BISECTIONS` steps (float64 has run out of resolution by then); the noise returned
    always has epsilon <= target."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}")
    sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        sigma_high *= 2
        eps_high = epsilon([(sigma_high, sample_rate, steps)], delta, accountant)
        if sigma_high > _MAX_SIGMA:
            raise PrivacyBudgetError(
                f"cannot reach epsilon {target_epsilon} with {steps} steps at sample rate "
                f"{sample_rate:.4g}: The privacy budget is too low."
            )
    for _ in range(_MAX_BISECTIONS):
        if target_epsilon - eps_high <= CALIBRATION_TOLERANCE:
            break
        sigma = (sigma_low + sigma_high) / 2
        eps = epsilon([(sigma, sample_rate, steps)], delta, accountant)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return float(sigma_high)


_MAX_SIGMA = 1e6  # Opacus' MAX_SIGMA
_MAX_BISECTIONS = 100


@dataclass(frozen=True)
class BudgetPlan:
    """A run's plan at one site. Stored in the ledger at the run's first round."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    records: int
    delta: float
    max_grad_norm: float
    accountant: str
    target_epsilon: float | None  # cap on this run's epsilon
    max_epsilon: float | None  # the site's budget over all runs in its ledger
    calibrated: bool  # noise multiplier computed from target_epsilon (else fixed in config)
    planned_epsilon: float  # epsilon of the whole planned run alone
    prior_epsilon: float  # spent by earlier runs at this site
    projected_total: float  # earlier runs + the whole planned run
    # The unit of privacy: "record", or the person column (data.privacy_unit). Older ledgers:
    # "record". `persons`: persons at the site when known (person level, or record level with
    # data.person_column); q and δ count them at person level. `max_person_records`: the
    # records of the site's largest person (the k of the group bound of a record-level run).
    privacy_unit: str = "record"
    person_column: str | None = None
    persons: int | None = None
    max_person_records: int | None = None

    @property
    def person_level(self) -> bool:
        return self.privacy_unit != "record"

    @property
    def round_mechanism(self) -> Mechanism:
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)
