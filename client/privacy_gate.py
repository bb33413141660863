"""The site's privacy gate: decides, before the data is used, whether this round may train.

Order of events at a site for one round (each ledger write is fsync'ed):
1. A run that already declined at this site declines again at once: its data is not read again.
2. First round of a run: plan it (noise multiplier for the whole run, budget check) and store the
   plan; a run that cannot fit is refused, and nothing has been trained.
3. Every round: if the next round would exceed the run's target or the site's budget, decline.
4. Otherwise the round's spend is recorded *before* training, so a crash can only over-count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fedtune.client.budget import BudgetPlan, UnitCounts, next_round, plan_run
from fedtune.common.config import RunConfig
from fedtune.common.ledger import PrivacyLedger
from fedtune.common.privacy import PrivacyBudgetError, epsilon

STATUS_OK = "ok"
STATUS_BUDGET_EXHAUSTED = "budget_exhausted"
STATUS_REFUSED = "refused"  # the planned run cannot fit (or delta is too large for the site)


@dataclass(frozen=True)
class Admission:
    admitted: bool
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    metrics: dict = field(default_factory=dict)  # what the site tells the server about privacy
    privacy_unit: str = "record"  # of the run's plan at this site


def admit_round(
    ledger: PrivacyLedger,
    cfg: RunConfig,
    *,
    run_id: str,
    server_round: int,
    steps: int,
    rounds: int,
    count_records: Callable[[], int],
    count_units: Callable[[], UnitCounts] | None = None,
) -> Admission:
    """Check the ledger and, if the round may train, record its spend (fsync) and admit it.

    `count_records` (and `count_units`: the privacy unit and the site's persons; None: record
    level, no person known) are called only for the first round of a run (to plan it).
    """
    dp = cfg.dp
    plan = ledger.plan(run_id)
    previous = ledger.declines(run_id)
    if previous:
        return _decline(ledger, plan, run_id, server_round, previous[-1].reason,
                        _status_of(previous[-1].reason), record=False)
    if plan is None:
        records = count_records()
        try:
            plan = plan_run(
                dp, records=records, batch_size=cfg.train.batch_size, rounds=rounds,
                local_steps=steps, prior=ledger.history(), where=f"site {ledger.site_id}: ",
                units=count_units() if count_units is not None else None,
            )
        except PrivacyBudgetError as e:
            return _decline(ledger, None, run_id, server_round, f"refused: {e}", STATUS_REFUSED,
                            records=records)
        ledger.save_plan(run_id, plan)
    decision = next_round(plan, steps, ledger.history(run_id), ledger.history())
    if not decision.ok:
        return _decline(ledger, plan, run_id, server_round,
                        f"budget exhausted: {decision.reason}", STATUS_BUDGET_EXHAUSTED)
    row = ledger.record_round(
        run_id=run_id, round=server_round, noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate, steps=steps, max_grad_norm=plan.max_grad_norm,
        delta=plan.delta, records=plan.records, accountant=plan.accountant,
        secret_randomness=not dp.reproducible_seed,  # as client/randomness.py::round_seed
        privacy_unit=plan.privacy_unit, persons=plan.persons if plan.person_level else None,
    )
    return Admission(
        True, plan.noise_multiplier, plan.sample_rate, privacy_unit=plan.privacy_unit,
        metrics={
            "records": plan.records,
            "epsilon": row.epsilon_run,
            "epsilon_round": epsilon([row.mechanism], plan.delta, plan.accountant),
            "epsilon_total": row.epsilon_total,
            "epsilon_prv": row.epsilon_run_prv,
            "epsilon_rdp": row.epsilon_run_rdp,
            "delta": plan.delta,
            "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate,
            "accountant": plan.accountant,
        },
    )


def _status_of(reason: str) -> str:
    return STATUS_REFUSED if reason.startswith("refused") else STATUS_BUDGET_EXHAUSTED


def _decline(
    ledger: PrivacyLedger,
    plan: BudgetPlan | None,
    run_id: str,
    server_round: int,
    reason: str,
    status: str,
    *,
    record: bool = True,
    records: int | None = None,
) -> Admission:
    if record:
        ledger.record_decline(run_id=run_id, round=server_round, reason=reason)
    metrics: dict = {"status": status, "reason": reason}
    if plan is not None:
        metrics.update(
            records=plan.records,
            epsilon=epsilon(ledger.history(run_id), plan.delta, plan.accountant),
            epsilon_total=epsilon(ledger.history(), plan.delta, plan.accountant),
            delta=plan.delta,
            noise_multiplier=plan.noise_multiplier,
        )
    elif records is not None:
        metrics["records"] = records
    return Admission(False, metrics=metrics)
