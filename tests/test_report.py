"""`fedtune report`: every number in the JSON and HTML equals the ledgers'; the HTML is
self-contained. One test reads a ledger written directly (two runs, a decline, a crash), the
others the real federated run of test_ledger_enforcement (shared within a session)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedtune.common.ledger import PrivacyLedger
from fedtune.report import build_report, render_html, write_report
from tests.conftest import run_fedtune


def _ledger_with_two_runs(state: Path) -> PrivacyLedger:
    ledger = PrivacyLedger(state, "site-7")
    for rnd in (1, 2):
        ledger.record_round(run_id="first", round=rnd, noise_multiplier=1.1, sample_rate=0.05,
                            steps=20, max_grad_norm=1.0, delta=1e-4, records=400,
                            accountant="rdp")
        ledger.record_payload(run_id="first", round=rnd, status="ok", size=1000 + rnd,
                              sha256=f"{rnd:064x}", tensors=4)
    ledger.record_round(run_id="second", round=1, noise_multiplier=0.9, sample_rate=0.05,
                        steps=20, max_grad_norm=1.0, delta=1e-4, records=400, accountant="rdp")
    # Round 2 of "second" was accounted, then the site crashed before anything was sent.
    ledger.record_round(run_id="second", round=2, noise_multiplier=0.9, sample_rate=0.05,
                        steps=20, max_grad_norm=1.0, delta=1e-4, records=400, accountant="rdp")
    ledger.record_payload(run_id="second", round=1, status="ok", size=1001,
                          sha256="ab" * 32, tensors=4)
    ledger.record_decline(run_id="second", round=3, reason="budget exhausted: test")
    return ledger


def test_report_of_a_ledger_file_equals_the_ledger(tmp_path: Path):
    ledger = _ledger_with_two_runs(tmp_path / "state")
    report = build_report(ledger.path)
    (site,) = report["sites"]
    rows = ledger.rows()
    assert site["site_id"] == "site-7" and site["records"] == 400
    assert site["epsilon_total"] == {"rdp": rows[-1].epsilon_total_rdp,
                                     "prv": rows[-1].epsilon_total_prv}
    assert [r["run_id"] for r in site["runs"]] == ["first", "second"]
    for run in site["runs"]:
        mine = ledger.rows(run["run_id"])
        assert [r["epsilon_run_rdp"] for r in run["rounds"]] == [r.epsilon_run_rdp for r in mine]
        assert [r["epsilon_run_prv"] for r in run["rounds"]] == [r.epsilon_run_prv for r in mine]
        assert run["epsilon_rdp"] == mine[-1].epsilon_run_rdp
        assert [(p["round"], p["bytes"], p["sha256"]) for p in run["payloads"]] == [
            (p.round, p.bytes, p.sha256) for p in ledger.payloads(run["run_id"])]
    second = site["runs"][1]
    assert second["accounted_without_payload"] == [2]
    messages = " ".join(w["message"] for w in report["warnings"])
    assert "over-counts" in messages and "declined from round 3" in messages
    assert "no lifetime budget" in messages
    # Total across runs composes both runs: above either run alone.
    assert site["epsilon_total"]["rdp"] > max(r["epsilon_rdp"] for r in site["runs"])
    page = render_html(report)
    assert "ab" * 32 in page and f"{site['epsilon_total']['rdp']:.4g}" in page


@pytest.mark.slow
def test_report_of_a_federated_run(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path):
    from tests.test_ledger_enforcement import enforcement_run

    run_dir = enforcement_run(tmp_path_factory)
    out = tmp_path / "out"
    res = run_fedtune("report", str(run_dir), "--out", str(out), "--no-pdf")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "privacy_report.json").read_text())
    page = (out / "privacy_report.html").read_text()
    assert report["run_id"] == "budget" and len(report["sites"]) == 2

    for site in report["sites"]:
        ledger = PrivacyLedger(run_dir / "sites" / site["site_id"] / "state", site["site_id"])
        rows, payloads = ledger.rows("budget"), ledger.payloads("budget")
        (run,) = site["runs"]
        assert site["records"] == rows[0].records
        assert site["epsilon_total"]["rdp"] == rows[-1].epsilon_total_rdp
        assert site["epsilon_total"]["prv"] == rows[-1].epsilon_total_prv
        assert [(r["round"], r["epsilon_run_rdp"], r["epsilon_run_prv"], r["noise_multiplier"],
                 r["sample_rate"], r["steps"]) for r in run["rounds"]] == [
            (r.round, r.epsilon_run_rdp, r.epsilon_run_prv, r.noise_multiplier, r.sample_rate,
             r.steps) for r in rows]
        assert [(p["round"], p["bytes"], p["sha256"]) for p in run["payloads"]] == [
            (p.round, p.bytes, p.sha256) for p in payloads]
        # The server logged the same hash for every payload the site recorded.
        assert all(p["matches_server"] for p in run["payloads"])
        assert site["budget_max_epsilon"] == pytest.approx(2.5)
        # The HTML shows the ledger's numbers and hashes.
        assert f"{rows[-1].epsilon_run_rdp:.4g}" in page
        assert all(p.sha256 in page for p in payloads)
    declined = [s for s in report["sites"] if s["runs"][0]["declines"]]
    assert len(declined) == 1
    assert any("declined from round 3" in w["message"] for w in report["warnings"])
    assert report["central_dp"]["epsilon_rdp"] == json.loads(
        (run_dir / "metrics.jsonl").read_text().splitlines()[-1])["central_dp"]["epsilon_rdp"]
    assert "Site-level (central) DP" in page

    # Self-contained: the plot is embedded, nothing is fetched from elsewhere.
    assert re.search(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', page)
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<script" not in page


def test_report_refuses_what_is_not_a_ledger(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="privacy_ledger.sqlite"):
        write_report(tmp_path / "empty")
    res = run_fedtune("report", str(tmp_path / "missing"))
    assert res.returncode == 2 and "no such run directory" in res.stderr


def test_report_never_claims_privacy_for_updates_trained_without_dp(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path / "state", "site-0")  # dp.enabled = false: payloads only
    ledger.record_payload(run_id="plain", round=1, status="ok", size=10, sha256="cd" * 32,
                          tensors=1)
    report = build_report(ledger.path)
    (site,) = report["sites"]
    assert site["runs"][0]["sent_without_dp"] == [1]
    assert any("WITHOUT differential privacy" in w["message"] for w in report["warnings"])
    page = render_html(report)
    assert "NO differential privacy guarantee" in page
    assert "revealed nothing" not in page
