"""Budget planning and enforcement at a site: pure functions over the mechanism history.

Planning (once per run, before any data is used): the noise multiplier that ends the planned run
(rounds x local steps Poisson-Gaussian steps at sample rate q = 1 / ceil(records / batch)) at or
below `dp.target_epsilon` (Opacus' calibration), refused if the site's lifetime budget
`dp.max_epsilon` cannot hold it on top of what earlier runs spent.

Enforcement (every round, before any data is used): the next round is trained only if the run's
epsilon stays <= `dp.target_epsilon` and the site's total over all runs stays <= `dp.max_epsilon`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedtune.client.trainer import poisson_sample_rate
from fedtune.common.config import DPConfig
from fedtune.common.privacy import (
    BudgetPlan,
    Mechanism,
    PrivacyBudgetError,
    calibrate_noise,
    check_delta,
    check_dp_range,
    epsilon,
)

# Opacus' calibration stops within 1% of the target from below; this absorbs float noise only.
TARGET_SLACK = 1.001


@dataclass(frozen=True)
class UnitCounts:
    """The privacy unit of a site's run and its persons, counted at the site before planning.

    `privacy_unit`: "record" or the person column; `person_column`: the column naming persons
    (the privacy unit, or data.person_column at record level), None if unknown; `persons` and
    `max_person_records` (the largest person's records) when it is known."""

    privacy_unit: str = "record"
    person_column: str | None = None
    persons: int | None = None
    max_person_records: int | None = None

    @property
    def person_level(self) -> bool:
        return self.privacy_unit != "record"


def unit_counts(privacy_unit: str, person_column: str | None,
                persons: Sequence[str] | None) -> UnitCounts:
    """Count the persons (and the largest person's records) of a site from each record's
    person id (`persons`; None when the data names no person)."""
    if persons is None:
        return UnitCounts(privacy_unit, None)
    sizes: dict[str, int] = {}
    for p in persons:
        sizes[p] = sizes.get(p, 0) + 1
    return UnitCounts(privacy_unit, person_column, len(sizes), max(sizes.values(), default=0))


@dataclass(frozen=True)
class RoundDecision:
    ok: bool
    epsilon_run: float  # after the next round, if trained
    epsilon_total: float
    reason: str = ""


def plan_run(
    dp: DPConfig,
    *,
    records: int,
    batch_size: int,
    rounds: int,
    local_steps: int,
    prior: Sequence[Mechanism] = (),
    where: str = "",
    units: UnitCounts | None = None,
) -> BudgetPlan:
    """Plan a run at a site, or raise PrivacyBudgetError (with what to change) if it cannot fit.

    `units`: the site's persons (None: none known). At person level (`units.privacy_unit` a
    column) q is over persons (1 / ceil(persons / batch)) and δ must be below 1/persons."""
    check_dp_range(dp.noise_multiplier, dp.target_epsilon, where)  # bounded accounting
    units = units or UnitCounts()
    if units.person_level:
        if units.persons is None:
            raise ValueError("a person-level plan needs the number of persons")
        check_delta(dp.delta, units.persons, where=where, unit="persons")
        q = poisson_sample_rate(units.persons, batch_size)
    else:
        check_delta(dp.delta, records, where=where)
        q = poisson_sample_rate(records, batch_size)
    total_steps = rounds * local_steps
    calibrated = dp.noise_multiplier is None
    if calibrated:
        assert dp.target_epsilon is not None  # DPConfig's validator
        try:
            sigma = calibrate_noise(dp.target_epsilon, dp.delta, q, total_steps, dp.accountant)
        except PrivacyBudgetError as e:
            raise PrivacyBudgetError(
                f"{where}{str(e).rstrip('.')}. Raise dp.target_epsilon, or plan fewer rounds "
                f"x local steps ({rounds} x {local_steps}), or a smaller batch"
            ) from None
    else:
        sigma = float(dp.noise_multiplier)
    run = [(sigma, q, total_steps)]
    planned = epsilon(run, dp.delta, dp.accountant)
    prior_eps = epsilon(prior, dp.delta, dp.accountant)
    total = epsilon([*prior, *run], dp.delta, dp.accountant) if prior else planned
    if dp.max_epsilon is not None:
        if prior_eps >= dp.max_epsilon:
            raise PrivacyBudgetError(
                f"{where}the site's privacy budget is used up: earlier runs spent "
                f"epsilon = {prior_eps:.4g} of dp.max_epsilon = {dp.max_epsilon:g} "
                f"(delta = {dp.delta:g})"
            )
        if calibrated and total > dp.max_epsilon:
            raise PrivacyBudgetError(
                f"{where}the planned run does not fit the site's budget: earlier runs spent "
                f"epsilon = {prior_eps:.4g}; this run (target {dp.target_epsilon:g}) would bring "
                f"the total to {total:.4g} > dp.max_epsilon = {dp.max_epsilon:g}. "
                "Lower dp.target_epsilon, or run fewer rounds / local steps."
            )
    return BudgetPlan(
        noise_multiplier=sigma, sample_rate=q, steps_per_round=local_steps, rounds=rounds,
        records=records, delta=dp.delta, max_grad_norm=dp.max_grad_norm,
        accountant=dp.accountant, target_epsilon=dp.target_epsilon, max_epsilon=dp.max_epsilon,
        calibrated=calibrated, planned_epsilon=planned, prior_epsilon=prior_eps,
        projected_total=total, privacy_unit=units.privacy_unit,
        person_column=units.person_column, persons=units.persons,
        max_person_records=units.max_person_records,
    )


def next_round(
    plan: BudgetPlan,
    steps: int,
    run_history: Sequence[Mechanism],
    site_history: Sequence[Mechanism],
) -> RoundDecision:
    """May the site train one more round of `steps` steps under `plan`?"""
    mech = (plan.noise_multiplier, plan.sample_rate, steps)
    eps_run = epsilon([*run_history, mech], plan.delta, plan.accountant)
    eps_total = epsilon([*site_history, mech], plan.delta, plan.accountant)
    if plan.target_epsilon is not None and eps_run > plan.target_epsilon * TARGET_SLACK:
        return RoundDecision(False, eps_run, eps_total,
                             f"this run's epsilon would reach {eps_run:.4g} > "
                             f"target {plan.target_epsilon:g}")
    if plan.max_epsilon is not None and eps_total > plan.max_epsilon:
        return RoundDecision(False, eps_run, eps_total,
                             f"the site's total epsilon would reach {eps_total:.4g} > "
                             f"budget {plan.max_epsilon:g}")
    return RoundDecision(True, eps_run, eps_total)
