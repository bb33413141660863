"""What leaves a site: the one list in common/disclosure.py equals what a real simulated round
sends (captured at the coordinator, in metrics.jsonl), what docs/privacy.md shows and what the
report prints."""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.common import disclosure
from fedtune.common.ledger import PrivacyLedger
from fedtune.report import build_report, render_html
from tests.conftest import FAST, REPO, run_fedtune, sets

DROPPED = ("examples_seen", "train_seconds", "fit_seconds", "epsilon_total", "payload_sha256")


def test_doc_table_is_generated_from_the_list():
    text = (REPO / "docs" / "privacy.md").read_text(encoding="utf-8")
    assert disclosure.doc_with_table(text) == text, (
        "docs/privacy.md is stale: python -m fedtune.common.disclosure docs/privacy.md")


def test_filter_drops_unlisted_and_not_opted_in_values():
    sent = {"site_id": "h-1", "status": "refused", "train_loss": 0.5, "examples_seen": 12,
            "epsilon_total": 4.2, "something_new": 1, "reason": "refused: spent epsilon = 4.25"}
    out = disclosure.disclose(sent)
    assert out == {"site_id": "h-1", "status": "refused",
                   "reason": "refused: spent epsilon = #"}
    assert disclosure.disclose(sent, frozenset({"train_loss"}))["train_loss"] == 0.5
    assert not set(DROPPED) & set(disclosure.ALL_KEYS)
    assert set(DROPPED) <= set(disclosure.NOT_SENT)


def test_a_real_round_sends_only_the_listed_values(tmp_path: Path):
    # The cheapest real path: 2 sites, 1 round, DP on; loss not opted in (rehearses a deployment).
    res = run_fedtune("simulate", *sets(*FAST, f"output.dir={tmp_path}", "output.run_name=d",
                                        "federation.num_sites=2", "federation.rounds=1",
                                        "federation.report_train_loss=false"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_dir = tmp_path / "d"
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sites = records[1]["sites"]  # the metrics each site replied with, as the server got them
    assert len(sites) == 2
    for site in sites:
        assert set(site) <= disclosure.METRIC_KEYS, set(site) - disclosure.METRIC_KEYS
        assert not set(site) & set(DROPPED)
        assert "train_loss" not in site  # opt-in, not opted in
        assert {"site_id", "records", "status", "epsilon", "delta"} <= set(site)
    assert records[1]["train_loss"] is None  # consumers cope with the absent loss

    # The server hashes what it received; it equals the site's ledger (which alone keeps it).
    received = records[1]["aggregation"]["received_sha256"]
    for site in sites:
        sid = site["site_id"]
        (payload,) = PrivacyLedger(run_dir / "sites" / sid / "state", sid).payloads()
        assert received[sid] == payload.sha256

    report = build_report(run_dir)
    assert [d["key"] for d in report["disclosure"]] == list(disclosure.ALL_KEYS)
    for s in report["sites"]:
        assert set(s["values_received"]) <= disclosure.METRIC_KEYS
        assert all(p["matches_server"] for r in s["runs"] for p in r["payloads"])
    page = render_html(report)
    assert all(f"<code>{key}</code>" in page for key in disclosure.ALL_KEYS)
    assert "Threat model" in page and "not the probability that a record leaks" in page
