"""`fedtune simulate --ray-address` runs the sites on a Ray cluster that already runs, and leaves
that cluster as it found it: running, with its CPUs free again.

A real head node (`ray start --head --block`, 2 CPUs) in a temporary directory; this test ends
it by its own process ids (never `ray stop`, which ends every Ray process of the user).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtune.simulations.runner import ray_address
from fedtune.simulations.stopping import kill_tree
from tests.conftest import FAST, REPO, run_fedtune, sets

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROBE = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.time() + 30  # the run's actors are released when its driver has gone
while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
    time.sleep(0.5)
print(json.dumps({"cpus": ray.cluster_resources().get("CPU"),
                  "free": ray.available_resources().get("CPU", 0)}))
"""


def _probe(address: str) -> dict:
    """The cluster's CPUs and free CPUs, from a fresh driver (fails if the cluster is gone)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-c", PROBE, address], capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A 2-CPU Ray head this module started; its address."""
    temp = tempfile.mkdtemp(prefix="fr")  # short: Ray's socket paths have a length limit
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}",
         "--disable-usage-stats", "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=temp,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None, "ray start --head exited"
                assert time.monotonic() < deadline, "the Ray head did not come up"
                time.sleep(0.5)
        assert _probe(address) == {"cpus": 2.0, "free": 2.0}  # up and idle
        yield address
    finally:  # only what this fixture started: the head's process tree
        kill_tree(head.pid)
        head.send_signal(signal.SIGKILL)
        head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_address_sources(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_address(None) == "10.0.0.1:6379"  # Ray's own variable
    assert ray_address("10.0.0.2:6379") == "10.0.0.2:6379"  # the option wins
    assert ray_address("local") is None  # a private Ray despite RAY_ADDRESS
    monkeypatch.delenv("RAY_ADDRESS")
    assert ray_address(None) is None


@pytest.mark.slow
def test_simulation_attached_to_a_running_cluster_leaves_it_running(tmp_path, ray_head):
    start = time.monotonic()
    res = run_fedtune("simulate", "--ray-address", ray_head, *sets(
        *FAST, f"output.dir={tmp_path}", "output.run_name=attached",
        "model.name=all-minilm-l6-v2", "federation.num_sites=2", "federation.rounds=1",
        "dp.noise_multiplier=1.0", "dp.target_epsilon=1000",
    ), timeout=400)
    took = time.monotonic() - start
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = [json.loads(x) for x in
               (tmp_path / "attached" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    assert sorted(s["status"] for s in records[1]["sites"]) == ["ok", "ok"]
    # The cluster still runs, and the run's site actors are gone (both CPUs free again).
    assert _probe(ray_head) == {"cpus": 2.0, "free": 2.0}
    print(f"attached run: {took:.0f} s")


@pytest.mark.slow
def test_ctrl_c_of_an_attached_simulation_leaves_the_cluster_running(tmp_path, ray_head):
    """SIGINT ends `fedtune simulate` within seconds (status 130); the cluster keeps running and
    Ray releases the run's site actors (the driver is gone)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "out.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedtune", "simulate", "--ray-address", ray_head, *sets(
                *FAST, f"output.dir={tmp_path}", "output.run_name=stopped",
                "model.name=all-minilm-l6-v2", "federation.num_sites=2", "federation.rounds=5",
                "dp.noise_multiplier=1.0", "dp.target_epsilon=1000")],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env={**env, "COLUMNS": "160"},
        )
    try:
        deadline = time.monotonic() + 300
        while "before training" not in log.read_text():  # the sites are being sent round 1
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped by SIGINT" in log.read_text()
    assert _probe(ray_head) == {"cpus": 2.0, "free": 2.0}


def test_an_unreachable_cluster_is_a_clear_error(tmp_path):
    port = _free_port()  # nothing listens there
    env_free = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run(
        [sys.executable, "-m", "fedtune", "simulate", "--ray-address", f"127.0.0.1:{port}",
         *sets(*FAST, f"output.dir={tmp_path}", "model.name=all-minilm-l6-v2",
               "federation.num_sites=2", "federation.rounds=1")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**env_free, "COLUMNS": "160"},
    )
    err = " ".join(res.stderr.split())
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"cannot attach to the Ray cluster at 127.0.0.1:{port}" in err, err[-2000:]
    assert "nothing answers there" in err, err[-2000:]
