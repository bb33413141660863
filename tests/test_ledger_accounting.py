"""The site ledger's epsilon against an independent accountant (Google's dp-accounting), budget
planning and enforcement decisions, and ledger persistence. No model needed: fast."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting import pld, rdp  # noqa: E402

from fedtune.client.budget import next_round, plan_run  # noqa: E402
from fedtune.common.config import DPConfig  # noqa: E402
from fedtune.common.ledger import PrivacyLedger  # noqa: E402
from fedtune.common.privacy import PrivacyBudgetError  # noqa: E402

logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's convergence chatter


def _event(history: list[tuple[float, float, int]]):
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
        for s, q, n in history
    ])


def google_rdp(history, delta: float) -> float:
    acc = rdp.RdpAccountant()
    acc.compose(_event(history))
    return acc.get_epsilon(delta)


def google_pld(history, delta: float) -> float:
    acc = pld.PLDAccountant()
    acc.compose(_event(history))
    return acc.get_epsilon(delta)


def _record(ledger: PrivacyLedger, run_id: str, rounds: int, sigma: float, q: float, steps: int,
            delta: float) -> None:
    for r in range(1, rounds + 1):
        ledger.record_round(run_id=run_id, round=r, noise_multiplier=sigma, sample_rate=q,
                            steps=steps, max_grad_norm=1.0, delta=delta, records=int(1 / q),
                            accountant="rdp")


# (sigma, q, rounds x steps per round, delta): small and large epsilon, q from 1/100 to 1.
CASES = [
    (1.0, 0.01, 4, 250, 1e-5),
    (0.8, 0.05, 3, 100, 1e-5),
    (2.0, 0.1, 3, 20, 1e-6),
    (1.1, 1 / 9, 4, 3, 1e-3),
    (0.6, 0.2, 2, 6, 1e-3),
    (1.5, 1.0, 5, 1, 1e-4),
]


@pytest.mark.parametrize(("sigma", "q", "rounds", "steps", "delta"), CASES)
def test_ledger_epsilon_matches_google_dp_accounting(tmp_path: Path, sigma, q, rounds, steps,
                                                    delta):
    ledger = PrivacyLedger(tmp_path, "site-0")
    _record(ledger, "run-a", rounds, sigma, q, steps, delta)
    last = ledger.rows()[-1]
    history = [(sigma, q, rounds * steps)]
    g_rdp, g_pld = google_rdp(history, delta), google_pld(history, delta)
    assert last.epsilon_run_rdp == pytest.approx(g_rdp, rel=0.01)
    assert last.epsilon_run_prv == pytest.approx(g_pld, rel=0.01)
    assert last.epsilon_total_rdp == last.epsilon_run_rdp  # one run: total = run
    assert last.epsilon_run == last.epsilon_run_rdp  # the enforcing accountant's column
    # Cumulative over rounds: never decreases, and each prefix also matches.
    eps = [r.epsilon_run_rdp for r in ledger.rows()]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    mid = len(eps) // 2
    assert eps[mid - 1] == pytest.approx(google_rdp([(sigma, q, mid * steps)], delta), rel=0.01)


def test_runs_compose_total_and_per_run(tmp_path: Path):
    delta = 1e-5
    ledger = PrivacyLedger(tmp_path, "site-0")
    _record(ledger, "run-a", 3, 1.0, 0.02, 50, delta)
    _record(ledger, "run-b", 2, 0.7, 0.05, 40, delta)
    a, b = ledger.rows("run-a")[-1], ledger.rows("run-b")[-1]
    assert a.epsilon_run_rdp == pytest.approx(google_rdp([(1.0, 0.02, 150)], delta), rel=0.01)
    assert b.epsilon_run_rdp == pytest.approx(google_rdp([(0.7, 0.05, 80)], delta), rel=0.01)
    both = [(1.0, 0.02, 150), (0.7, 0.05, 80)]
    assert b.epsilon_total_rdp == pytest.approx(google_rdp(both, delta), rel=0.01)
    assert b.epsilon_total_prv == pytest.approx(google_pld(both, delta), rel=0.01)
    assert b.epsilon_total_rdp > max(a.epsilon_run_rdp, b.epsilon_run_rdp)
    assert ledger.run_ids() == ["run-a", "run-b"]
    # A ledger reopened from its file (as a report does) reads the same rows.
    again = PrivacyLedger.from_file(ledger.path)
    assert again.rows() == ledger.rows()


def test_plan_calibrates_noise_to_end_the_run_at_target():
    dp = DPConfig(target_epsilon=2.0, delta=1e-5)
    plan = plan_run(dp, records=600, batch_size=8, rounds=5, local_steps=20)
    assert plan.calibrated and plan.sample_rate == pytest.approx(1 / 75)
    eps = google_rdp([(plan.noise_multiplier, plan.sample_rate, 100)], 1e-5)
    assert eps <= 2.0 * 1.01  # ends the planned run at <= target (independent accountant)
    assert eps >= 2.0 * 0.95  # and not with much more noise than needed
    # Every planned round is admitted, the one after the plan is not.
    history: list = []
    for _ in range(5):
        decision = next_round(plan, 20, history, history)
        assert decision.ok
        history.append(plan.round_mechanism)
    assert not next_round(plan, 20, history, history).ok


def test_calibrated_noise_is_kept_per_machine_and_checked_before_reuse(tmp_path: Path,
                                                                      monkeypatch):
    import json

    from fedtune.common import privacy

    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    args = (3.0, 1e-5, 0.25, 40, "rdp")
    privacy.calibrate_noise.cache_clear()  # the per-process memo would hide the file
    sigma = privacy.calibrate_noise(*args)
    path = privacy.noise_cache_file()
    assert path.is_relative_to(tmp_path)
    stored = json.loads(path.read_text())
    assert list(stored.values()) == [sigma]

    # A fresh process (memo cleared) takes the stored value: the same noise.
    privacy.calibrate_noise.cache_clear()
    assert privacy.calibrate_noise(*args) == sigma

    # An edited entry with less noise would overspend the budget: recomputed, not trusted.
    (key,) = stored
    path.write_text(json.dumps({key: sigma * 0.8}))
    privacy.calibrate_noise.cache_clear()
    assert privacy.calibrate_noise(*args) == sigma
    assert json.loads(path.read_text())[key] == sigma
    # So is a damaged file.
    path.write_text("{not json")
    privacy.calibrate_noise.cache_clear()
    assert privacy.calibrate_noise(*args) == sigma
    privacy.calibrate_noise.cache_clear()


def test_plan_refuses_delta_too_large_for_the_site():
    with pytest.raises(PrivacyBudgetError, match=r"not below 1/records = 1/50"):
        plan_run(DPConfig(delta=0.02), records=50, batch_size=8, rounds=1, local_steps=1)


def test_plan_refuses_a_run_that_cannot_fit_the_site_budget():
    dp = DPConfig(target_epsilon=3.0, max_epsilon=3.1, delta=1e-5)
    first = plan_run(dp, records=400, batch_size=8, rounds=2, local_steps=10)
    assert first.projected_total <= 3.1
    prior = [(first.noise_multiplier, first.sample_rate, 20)]  # the first run was spent
    with pytest.raises(PrivacyBudgetError, match="does not fit the site's budget"):
        plan_run(dp, records=400, batch_size=8, rounds=2, local_steps=10, prior=prior)
    # A smaller second run fits.
    small = plan_run(DPConfig(target_epsilon=0.5, max_epsilon=3.1, delta=1e-5), records=400,
                     batch_size=8, rounds=2, local_steps=10, prior=prior)
    assert small.projected_total <= 3.1
    # A target that no noise level reaches in that many steps is refused too.
    with pytest.raises(PrivacyBudgetError, match="cannot reach epsilon 0.1 with 20 steps"):
        plan_run(DPConfig(target_epsilon=0.1, delta=1e-5), records=400, batch_size=8, rounds=2,
                 local_steps=10)


def test_enforcement_admits_exactly_the_rounds_that_fit():
    sigma, q, steps, delta = 1.0, 1 / 9, 2, 1e-3
    budget = (google_rdp([(sigma, q, 3 * steps)], delta)
              + google_rdp([(sigma, q, 4 * steps)], delta)) / 2  # between 3 and 4 rounds
    dp = DPConfig(noise_multiplier=sigma, target_epsilon=None, max_epsilon=budget, delta=delta)
    plan = plan_run(dp, records=36, batch_size=4, rounds=10, local_steps=steps)
    history: list = []
    while next_round(plan, steps, history, history).ok:
        history.append(plan.round_mechanism)
    assert len(history) == 3


def test_old_ledger_is_migrated(tmp_path: Path):
    """A ledger written before the PRV columns existed opens and keeps its rows."""
    path = tmp_path / PrivacyLedger.FILENAME
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE rounds (run_id TEXT, site_id TEXT, round INTEGER, "
                   "noise_multiplier REAL, sample_rate REAL, steps INTEGER, max_grad_norm REAL, "
                   "delta REAL, records INTEGER, accountant TEXT, epsilon_run REAL, "
                   "epsilon_total REAL, recorded_at REAL)")
        db.execute("INSERT INTO rounds VALUES ('old', 'site-0', 1, 1.0, 0.1, 5, 1.0, 1e-5, 10, "
                   "'rdp', 1.5, 1.5, 1.0)")
    ledger = PrivacyLedger(tmp_path, "site-0")
    (row,) = ledger.rows()
    assert row.epsilon_run == 1.5 and row.epsilon_run_prv is None
    new = ledger.record_round(run_id="new", round=1, noise_multiplier=1.0, sample_rate=0.1,
                              steps=5, max_grad_norm=1.0, delta=1e-5, records=10,
                              accountant="rdp")
    assert new.epsilon_total_rdp == pytest.approx(google_rdp([(1.0, 0.1, 10)], 1e-5), rel=0.01)
