"""A run in which no site trained fails loudly: `fedtune simulate` exits non-zero and names each
site with its reason, instead of printing the usual summary of an adapter that never moved.

The real simulation is made to fail deterministically: a fixed noise multiplier so small that one
round of DP-SGD would spend far more than the run's target ε, so every site's privacy gate
declines every round ("budget exhausted: ...") before touching its data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.server.outcome import NO_REPLY, site_failure_message, training_failure
from tests.conftest import FAST, REPO, run_fedtune, sets


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


def test_training_failure_names_sites_that_failed_without_replying():
    """A dead worker's site, from the round's `participation.dropped` (the error text names it,
    also when the node had no name yet), and a site that dropped out by name."""
    died = ("<class 'RuntimeError'>:<'" + site_failure_message(
        "h-a", "its Ray worker died: killed for lack of memory") + "'>")
    rounds = [{"round": 1, "sites": [], "participation": {
        "trained": [], "declined": {}, "refused": {},
        "dropped": {"node 7": died, "h-b": "no reply within 60 s"}}}]
    msg = training_failure(rounds, expected_sites=["h-a", "h-b", "h-c"])
    assert msg is not None
    assert "h-a: failed: its Ray worker died: killed for lack of memory" in msg
    assert "h-b: dropped: no reply within 60 s" in msg
    assert f"h-c: {NO_REPLY}" in msg
    assert "node 7" not in msg


def test_death_cause_tells_the_memory_monitor_from_a_plain_kill():
    """Ray's memory monitor is named only when Ray says so; a SIGKILL'd worker's message merely
    lists the OOM killer among possible causes."""
    from ray.exceptions import OutOfMemoryError

    from fedtune.simulations.worker_deaths import death_cause

    oom = death_cause(OutOfMemoryError("Task was killed due to the node running low on memory."))
    assert "killed by Ray's memory monitor" in oom
    killed = death_cause(RuntimeError(
        "The actor died unexpectedly before finishing this task. Potential root causes: (1) The "
        "process is killed by SIGKILL by OOM killer due to high memory usage."))
    assert "ended without warning" in killed and "memory monitor" not in killed


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


def _site_workers(pid: int) -> list[int]:
    """The Ray actor processes running simulated sites below process `pid`."""
    from fedtune.simulations.stopping import descendants

    out = []
    for p in descendants(pid):
        try:
            title = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if title.startswith(b"ray::ClientAppActor"):
            out.append(p)
    return out


@pytest.mark.slow
def test_killed_site_workers_are_named_with_the_cause_and_the_run_fails(tmp_path):
    """SIGKILL every site's Ray worker (what the kernel's OOM killer does) during round 1: the
    console names each site with the cause at once, and the run exits 1 naming them again
    instead of printing a summary."""
    log = tmp_path / "out.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedtune", "simulate", *sets(
                *FAST, f"output.dir={tmp_path}", "output.run_name=killed",
                "model.name=all-minilm-l6-v2", "federation.num_sites=2", "federation.rounds=1",
                "federation.parallel_sites=2", "dp.noise_multiplier=1.0",
                "dp.target_epsilon=1000")],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env={**env, "COLUMNS": "200"},
        )
    try:
        deadline = time.monotonic() + 300
        while "before training" not in log.read_text():  # round 1 is being sent to the sites
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        killed: set[int] = set()
        while len(killed) < 2 and time.monotonic() < deadline:
            for p in _site_workers(proc.pid):
                if p not in killed:
                    os.kill(p, signal.SIGKILL)
                    killed.add(p)
            time.sleep(0.2)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = " ".join(log.read_text().split())
    assert rc == 1, text[-4000:]
    assert "no site trained in any of the 1 round(s)" in text, text[-4000:]
    for site in ("site-0", "site-1"):
        assert f"{site}: its Ray worker died" in text, text[-4000:]  # at once, on the console
        assert f"{site}: failed: its Ray worker died" in text, text[-4000:]  # in the verdict
    assert "final adapter" not in text
