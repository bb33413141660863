"""A run in which no site trained fails loudly: `fedtune simulate` exits non-zero and names each
site with its reason, instead of printing the usual summary of an adapter that never moved.

The real simulation is made to fail deterministically: a fixed noise multiplier so small that one
round of DP-SGD would spend far more than the run's target ε, so every site's privacy gate
declines every round ("budget exhausted: ...") before touching its data.
"""

from __future__ import annotations

import json

import pytest

from fedtune.server.outcome import NO_REPLY, training_failure
from tests.conftest import FAST, run_fedtune, sets


@pytest.mark.slow
def test_simulation_where_no_site_trains_exits_non_zero_naming_each_site(tmp_path):
    res = run_fedtune("simulate", *sets(
        *FAST, f"output.dir={tmp_path}", "output.run_name=none-trained",
        "model.name=all-minilm-l6-v2", "federation.num_sites=3", "federation.rounds=2",
        "dp.noise_multiplier=0.3", "dp.target_epsilon=0.01",
    ))
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-4000:]
    err = " ".join(res.stderr.split())  # rich wraps long lines
    assert "no site trained in any of the 2 round(s)" in err, err[-3000:]
    for site in ("site-0", "site-1", "site-2"):
        assert f"{site}: budget_exhausted: budget exhausted" in err, err[-3000:]
    # not the usual summary
    assert "final adapter" not in res.stdout and "Held-out evaluation" not in res.stdout
    # what the message says is what metrics.jsonl recorded
    records = [json.loads(x) for x in
               (tmp_path / "none-trained" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert sorted(s["site_id"] for s in r["sites"]) == ["site-0", "site-1", "site-2"]
        assert all(s["status"] == "budget_exhausted" and s["reason"] for s in r["sites"])


def test_training_failure_min_fit_sites_and_silent_sites():
    """The same check on hand-made round records: fewer than min_fit_sites in every round, and a
    site that never replied (no entry at all) is named too."""
    ok = {"site_id": "h-a", "status": "ok", "epsilon": 1.0}
    refused = {"site_id": "h-b", "status": "refused",
               "reason": "refused: site policy: privacy.max_delta"}
    rounds = [{"round": 0, "sites": []},
              {"round": 1, "sites": [ok, refused]}, {"round": 2, "sites": [ok, refused]}]
    assert training_failure(rounds, min_fit_sites=1, expected_sites=["h-a", "h-b"]) is None
    msg = training_failure(rounds, min_fit_sites=2, expected_sites=["h-a", "h-b", "h-c"])
    assert msg is not None
    assert "fewer than federation.min_fit_sites = 2 sites trained in every one of the 2" in msg
    assert "h-a: trained" in msg
    assert "h-b: refused: refused: site policy: privacy.max_delta" in msg
    assert f"h-c: {NO_REPLY}" in msg
    assert training_failure([{"round": 0}], min_fit_sites=1) is None  # judged elsewhere


@pytest.mark.slow
def test_coordinator_run_where_no_site_trains_exits_non_zero_naming_each_site(tmp_path):
    """`fedtune server` with three real site daemons: every site declines the only round (same
    cause as above), the run completes in Flower's terms, and the coordinator exits 1 naming
    each site and its reason."""
    from tests.test_deploy import SITES
    from tests.test_deploy_startup import SETTINGS, SitesFirst

    dep = SitesFirst(tmp_path, [*SETTINGS, "dp.noise_multiplier=0.3", "dp.target_epsilon=0.01"])
    try:
        server = dep.start()
        try:
            rc = server.popen.wait(timeout=240)
        except Exception:  # noqa: BLE001 - report what the coordinator said
            pytest.fail("the coordinator did not finish:\n" + server.text()[-4000:])
        out = " ".join(server.text().split())
        assert rc == 1, out[-4000:]
        assert "run status: finished:completed" in out
        assert "no site trained in any of the 1 round(s)" in out, out[-4000:]
        for site in SITES:
            assert f"{site}: budget_exhausted: budget exhausted" in out, out[-4000:]
        assert "final adapter" not in out
    finally:
        dep.stop()
