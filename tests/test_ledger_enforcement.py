"""Budget enforcement in a real federation (Flower simulation, Ray, Opacus, MiniLM): a site with a
tiny budget stops at the right round, declines with "budget_exhausted", the server records it and
carries on with the other site. Site-level central DP (server-side fixed clipping) is on in the
same run, so its accountant must see the decline too."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from fedtune.common.ledger import PrivacyLedger
from tests.conftest import FAST, run_fedtune, sets

pytestmark = pytest.mark.slow
dp_accounting = pytest.importorskip("dp_accounting")

SIGMA, DELTA, STEPS, ROUNDS, BATCH, BUDGET = 1.0, 1e-3, 2, 4, 4, 2.5
CENTRAL_Z, CENTRAL_DELTA = 0.5, 0.01
# Dirichlet split of the demo data (seed 0): two sites of unequal size, so the smaller one
# (larger sample rate, more epsilon per round) runs out first.
SETTINGS = [
    *FAST, "model.name=all-minilm-l6-v2", "federation.num_sites=2", f"federation.rounds={ROUNDS}",
    f"train.local_steps={STEPS}", f"train.batch_size={BATCH}", 'data.partition="dirichlet"',
    "data.dirichlet_alpha=0.5", f"dp.noise_multiplier={SIGMA}", "dp.target_epsilon=1000",
    f"dp.max_epsilon={BUDGET}", f"dp.delta={DELTA}", "central_dp.enabled=true",
    f"central_dp.noise_multiplier={CENTRAL_Z}", "central_dp.clipping_norm=1.0",
    f"central_dp.delta={CENTRAL_DELTA}",
]
_RUNS: dict[str, Path] = {}


def enforcement_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of the simulation (made once per test session, shared with reports)."""
    if "run" not in _RUNS:
        out = tmp_path_factory.mktemp("enforcement")
        res = run_fedtune("simulate", *sets(*SETTINGS, f"output.dir={out}",
                                            "output.run_name=budget"))
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        _RUNS["run"] = out / "budget"
    return _RUNS["run"]


def _google_rdp(events: list, delta: float) -> float:
    from dp_accounting import rdp

    logging.getLogger("absl").setLevel(logging.ERROR)
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.ComposedDpEvent(events))
    return acc.get_epsilon(delta)


def _expected_rounds(records: int) -> int:
    """Rounds that fit the budget, by an independent accountant (Google's dp-accounting)."""
    q = 1 / math.ceil(records / BATCH)
    fits = 0
    for k in range(1, ROUNDS + 1):
        sampled = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(SIGMA))
        eps = _google_rdp([dp_accounting.SelfComposedDpEvent(sampled, k * STEPS)], DELTA)
        assert abs(eps - BUDGET) > 0.02 * BUDGET, "test budget too close to a round's epsilon"
        if eps <= BUDGET:
            fits = k
    return fits


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return enforcement_run(tmp_path_factory)


def test_tiny_budget_stops_the_site_at_the_right_round(run_dir: Path):
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(ROUNDS + 1))  # the server carried on
    sites = sorted(p.name for p in (run_dir / "sites").iterdir())
    expected = {}
    for sid in sites:
        records = len((run_dir / "sites" / sid / "data" / "train.jsonl").read_text().splitlines())
        expected[sid] = _expected_rounds(records)
    # The setting is meant to stop exactly one site partway: check that it does.
    assert sorted(expected.values()) == [2, ROUNDS], expected

    for sid in sites:
        ledger = PrivacyLedger(run_dir / "sites" / sid / "state", sid)
        trained = [r.round for r in ledger.rows("budget")]
        assert trained == list(range(1, expected[sid] + 1))
        assert all(r.epsilon_total <= BUDGET for r in ledger.rows())
        statuses = [next(s["status"] for s in m["sites"] if s["site_id"] == sid)
                    for m in metrics[1:]]
        assert statuses == ["ok"] * expected[sid] + ["budget_exhausted"] * (
            ROUNDS - expected[sid])
        if expected[sid] < ROUNDS:
            (decline,) = ledger.declines("budget")  # declined once; later rounds follow it
            assert decline.round == expected[sid] + 1 and "budget" in decline.reason
            # What left the site in the declined rounds was an all-zero update, recorded.
            sent = {p.round: p.status for p in ledger.payloads("budget")}
            assert sent == {r: ("ok" if r <= expected[sid] else "budget_exhausted")
                            for r in range(1, ROUNDS + 1)}
    # The global adapter kept moving with the other site: a checkpoint after every round.
    assert all((run_dir / "checkpoints" / f"round-{r:04d}").is_dir()
               for r in range(1, ROUNDS + 1))


def test_central_dp_accountant_counts_the_declined_site(run_dir: Path):
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    central = [m["central_dp"] for m in metrics if "central_dp" in m]
    assert [c["round"] for c in central] == list(range(1, ROUNDS + 1))
    aggregated = [c["sites_aggregated"] for c in central]
    assert aggregated == [sum(s["status"] == "ok" for s in m["sites"]) for m in metrics[1:]]
    zs = [c["noise_multiplier_effective"] for c in central]
    assert zs == pytest.approx([CENTRAL_Z * a / 2 for a in aggregated])
    events = [dp_accounting.GaussianDpEvent(z) for z in zs]
    assert central[-1]["epsilon_rdp"] == pytest.approx(_google_rdp(events, CENTRAL_DELTA),
                                                       rel=0.01)


def test_declined_site_does_not_read_its_data_again(tmp_path: Path):
    """In-process site (real model, real DP-SGD): after declining, later rounds of the run
    decline without touching the data file; a later run finds the site's budget used up."""
    from fedtune.client.client_app import FedtuneClient, SiteSpec
    from fedtune.common.config import load_config
    from fedtune.common.data import write_jsonl
    from fedtune.common.demo_data import classification_demo
    from fedtune.common.lora import get_adapter
    from fedtune.common.model_cache import get_runtime
    from fedtune.common.privacy import epsilon
    from fedtune.common.tasks import num_labels, resolve_task

    rows = classification_demo(40, 5)
    data = tmp_path / "data" / "train.jsonl"
    write_jsonl(data, rows)
    q = 1 / 10
    one, two = (epsilon([(SIGMA, q, k)], DELTA) for k in (1, 2))
    labels = json.dumps(sorted({r["label"] for r in rows}))
    cfg = load_config(None, [
        "model.name=all-minilm-l6-v2", "model.max_length=32", f"train.batch_size={BATCH}",
        "train.threads=1", f"dp.noise_multiplier={SIGMA}", "dp.target_epsilon=1000",
        f"dp.max_epsilon={(one + two) / 2}", f"dp.delta={DELTA}", f"data.labels={labels}",
    ])
    task = resolve_task(cfg)
    params = get_adapter(get_runtime(cfg, task, num_labels(cfg, task)).model)
    client = FedtuneClient(SiteSpec("site-x", data, tmp_path / "state"), cfg)

    def fit(run_id: str, rnd: int) -> tuple[int, dict]:
        _, n, metrics = client.fit(params, {"run_id": run_id, "server_round": rnd,
                                            "local_steps": 1, "num_rounds": 5})
        return n, metrics

    assert fit("r1", 1)[1]["status"] == "ok"
    n, metrics = fit("r1", 2)
    assert (n, metrics["status"]) == (0, "budget_exhausted")
    assert metrics["epsilon"] == pytest.approx(one)  # what it spent, not what it would
    data.rename(data.with_suffix(".moved"))  # the data is gone: reading it would fail
    n, metrics = fit("r1", 3)
    assert (n, metrics["status"]) == (0, "budget_exhausted")
    ledger = PrivacyLedger(tmp_path / "state", "site-x")
    assert [r.round for r in ledger.rows()] == [1] and len(ledger.declines("r1")) == 1
    data.with_suffix(".moved").rename(data)
    # Runs compose: a new run at this site starts from what r1 spent, and one more round
    # would take the site's total over its budget.
    n, metrics = fit("r2", 1)
    assert (n, metrics["status"]) == (0, "budget_exhausted")
    assert "site's total epsilon would reach" in metrics["reason"]
    # The total over runs stays at the site (common/disclosure.py): in its ledger, not sent.
    assert "epsilon_total" not in metrics
    assert ledger.rows()[-1].epsilon_total == pytest.approx(one)
    assert [r.round for r in ledger.rows()] == [1]
