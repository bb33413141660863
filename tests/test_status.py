"""`fedtune status` and the run-level report, on files written by fedtune's own writers: the
coordinator's status.json (server/status_file.py), a metrics.jsonl in the recorder's format, and
real site ledgers (common/ledger.py). No federation is started here; the real deployment is
covered in tests/test_deploy.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedtune.cli.status import StatusInputError, classify, ledger_status, run_status
from fedtune.common.config import load_config
from fedtune.common.ledger import PrivacyLedger
from fedtune.server.status_file import SiteSeen, StatusFile, load_status, waiting_for
from tests.conftest import run_fedtune

SITE = {"records": 36, "delta": 1e-5, "noise_multiplier": 0.6, "accountant": "rdp"}


def _metrics(run_dir: Path) -> list[dict]:
    """Three records as server/recorder.py writes them: round 0, a round where site-2 refused
    and site-3 dropped out, a round where the server rejected site-1's update."""
    recs = [
        {"run_id": "r", "round": 0, "eval": {"loss": 1.0}, "sites": [], "adapter_norm": 1.0},
        {"run_id": "r", "round": 1, "eval": {"loss": 0.9}, "adapter_norm": 1.1,
         "checkpoint_seconds": 0.1, "aggregation": {"sites": 2, "upload_bytes": 10},
         "participation": {"dropped": {"site-3": "no reply"}},
         "sites": [{"site_id": "site-0", "status": "ok", "epsilon": 1.5, **SITE},
                   {"site_id": "site-1", "status": "ok", "epsilon": 2.5, **SITE},
                   {"site_id": "site-2", "status": "refused", "reason": "site policy: #"}]},
        {"run_id": "r", "round": 2, "adapter_norm": 1.1, "checkpoint_seconds": 0.1,
         "aggregation": {"sites": 2, "upload_bytes": 10,
                         "rejected": [{"site_id": "site-1", "reason": "norm too large"}]},
         "sites": [{"site_id": "site-0", "status": "ok", "epsilon": 2.0, **SITE},
                   {"site_id": "site-1", "status": "ok", "epsilon": 3.0, **SITE}]},
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def test_waiting_for_says_what_the_next_round_needs():
    args = {"rounds": 3, "num_sites": 3, "min_fit_sites": 2}
    text = waiting_for(state="running", done=1, connected=["site-0"], **args)
    assert text is not None and "round 2" in text and "federation.num_sites = 3" in text
    assert "1 connected (site-0)" in text
    full = waiting_for(state="running", done=1, connected=["a", "b", "c"], **args)
    assert full is not None and "federation.min_fit_sites = 2" in full
    assert waiting_for(state="finished", done=3, connected=[], **args) is None
    assert waiting_for(state="running", done=3, connected=[], **args) is None


def test_run_status_names_sites_connections_and_reported_epsilon(tmp_path: Path):
    run_dir = tmp_path / "r"
    _metrics(run_dir)
    cfg = load_config(None, ["federation.num_sites=4", "federation.rounds=3",
                             "federation.min_fit_sites=2"])
    now = time.time()
    seen = [SiteSeen("site-0", 1, "online", now - 5), SiteSeen("site-1", 2, "offline", now - 90)]
    live = StatusFile(run_dir, "r", cfg, ["site-0", "site-1", "site-2", "site-3"],
                      nodes=lambda: seen)
    live.update("running")
    written = load_status(run_dir)
    assert written is not None and written["state"] == "running" and written["last_round"] == 2
    data = run_status(run_dir, now=now)
    assert (data["run_id"], data["rounds"], data["last_round"], data["current_round"]) == (
        "r", 3, 2, 3)
    assert not data["finished"] and data["connected"] == ["site-0"]
    assert "round 3 waits for federation.num_sites = 4" in data["waiting_for"]
    sites = {s["site_id"]: s for s in data["sites"]}
    assert list(sites) == ["site-0", "site-1", "site-2", "site-3"]
    assert sites["site-0"]["reported_epsilon"] == 2.0 and sites["site-0"]["epsilon_round"] == 2
    assert sites["site-1"]["connected"] is False and sites["site-1"]["last_seen_s_ago"] == 90
    assert sites["site-2"]["last_status"] == "refused" and sites["site-2"]["rounds_trained"] == 0
    assert sites["site-3"]["last_status"] == "dropped"
    assert "reported by each site" in data["epsilon_source"]
    # A status file nobody updates any more is called out.
    later = run_status(run_dir, now=now + 600)
    assert any("still running" in n for n in later["notes"])
    live.close("finished:completed")
    assert run_status(run_dir)["finished"] is True


def test_ledger_status_counts_a_retried_round_and_splits_refusals(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path / "state", "site-0")
    for rnd in (1, 2, 2):  # round 2 retried (a coordinator restart): both spends count
        ledger.record_round(run_id="a", round=rnd, noise_multiplier=1.0, sample_rate=0.1,
                            steps=5, max_grad_norm=1.0, delta=1e-5, records=100,
                            accountant="rdp")
    ledger.record_decline(run_id="a", round=3, reason="budget exhausted: test")
    ledger.record_decline(run_id="b", round=1, reason="refused: site policy")
    data = ledger_status(ledger.path)
    (site,) = data["sites"]
    run_a, run_b = site["runs"]
    assert run_a["rounds_trained"] == 3 and run_a["retried"] == {"2": 1}
    assert run_a["last_round"] == 3 and run_a["epsilon"] == ledger.rows("a")[-1].epsilon_run
    assert [d["round"] for d in run_a["declines"]] == [3] and run_a["refusals"] == []
    assert run_b["refusals"][0]["reason"].startswith("refused") and run_b["rounds_trained"] == 0
    assert site["epsilon_lifetime"] == ledger.rows()[-1].epsilon_total
    assert classify(tmp_path / "state") == ("site", ledger.path)

    # The site report says the retry instead of counting an extra round silently.
    from fedtune.report import build_report, render_html
    from fedtune.report.wording import sample_level

    report = build_report(ledger.path)
    run = next(r for r in report["sites"][0]["runs"] if r["run_id"] == "a")
    assert run["retried"] == [{"round": 2, "retries": 1}]
    report["sites"][0]["focus_run"] = "a"
    assert "3 (round 2 retried once)" in render_html(report)
    assert "round 2 retried once" in sample_level(report["sites"][0], run, 1.0)
    messages = " ".join(w["message"] for w in report["warnings"])
    assert "[privacy] max_epsilon" in messages and "(dp.max_epsilon)" not in messages


def test_run_level_report_labels_what_the_sites_reported(tmp_path: Path):
    from fedtune.report import write_report

    run_dir = tmp_path / "r"
    _metrics(run_dir)
    data, files = write_report(run_dir, pdf=False)
    assert data["kind"] == "run_level" and files.markdown is not None
    r1 = data["rounds"][1]
    assert r1["took_part"] == ["site-0", "site-1"]
    assert r1["did_not_train"] == {"refused": [{"site_id": "site-2", "reason": "site policy: #"}]}
    assert r1["dropped"] == [{"site_id": "site-3", "reason": "no reply"}]
    assert data["rounds"][2]["checks"]["rejected"][0]["site_id"] == "site-1"
    assert data["reported_sites"][0]["last_reported"]["epsilon"] == 2.0
    for text in (files.html.read_text(), files.markdown.read_text()):
        assert "REPORTED" in text and "source of truth" in text
        assert "site-0, site-1" in text and "refused: site-2" in text and "dropped: site-3" in text


def test_status_refuses_what_is_neither_a_run_nor_a_ledger(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StatusInputError, match="expected a coordinator's run directory"):
        classify(tmp_path / "empty")
    (tmp_path / "junk.sqlite").write_bytes(b"not a database")
    with pytest.raises(StatusInputError, match="not a fedtune privacy ledger"):
        classify(tmp_path / "junk.sqlite")
    res = run_fedtune("status", str(tmp_path / "missing"))
    assert res.returncode == 2 and "no such file or directory" in res.stderr
