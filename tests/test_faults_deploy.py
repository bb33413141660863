"""Fault injection on a real deployment on 127.0.0.1 (fixtures and helpers of test_deploy.py):
`fedtune server` (SuperLink, TLS, SuperNode authentication, SecAgg+) and three `fedtune client`
site daemons, 2 rounds of DP-LoRA on the embedded MiniLM classifier. No mocks: real processes,
killed with SIGKILL.

1. site-2 is killed in the middle of round 1 (right after its ledger recorded the round's spend,
   while it trains). Round 1 completes with site-0 and site-1 (federation.min_fit_sites = 2;
   SecAgg+ with 3 sites tolerates one dropout; site-2 is in the aggregate only if its ledger
   shows its update had left before the kill). site-2's daemon is restarted and the site
   takes part in round 2.
2. The coordinator (its whole process group: `fedtune server`, the SuperLink, the ServerApp) is
   killed in the middle of round 2. `fedtune server --resume` continues after round 1: same run
   id, global adapter from checkpoints/round-0001, round 2 run again, no round lost or repeated.
3. The sites' ledgers hold every round each site actually trained (the interrupted attempts
   included: a retried round is a second spend, and the ledger only over-counts).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_deploy import SITES, Proc, _site_toml, env, fedtune_cmd, free_port, listening

pytestmark = pytest.mark.slow

RUN = "fault-run"
SETTINGS = [
    "model.name=all-minilm-l6-v2",
    "model.max_length=32",
    "train.local_steps=2",
    "train.batch_size=4",
    "train.threads=1",
    "federation.num_sites=3",
    "federation.rounds=2",
    "federation.min_fit_sites=2",
    "federation.round_timeout_s=90",  # a safety net: Flower notices a dead site within ~60 s
    "federation.max_update_norm=1000",  # validation on (no honest update comes close)
    "federation.secagg_max_records=100",
    "data.demo_records=120",
    "data.max_eval_records=16",
    # A fixed noise multiplier leaves room for the retried round (the target still caps it).
    "dp.noise_multiplier=1.5",
    "dp.target_epsilon=8.0",
]
DEADLINE = 400  # seconds for the whole scenario (measured: see docs/reliability.md)


class Scenario:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[Proc] = []
        self.fleet, self.control = free_port(), free_port()
        self.t0 = time.monotonic()
        self.timeline: list[tuple[float, str]] = []

    def mark(self, what: str) -> None:
        self.timeline.append((round(time.monotonic() - self.t0, 1), what))
        print(f"[{self.timeline[-1][0]:6.1f} s] {what}", flush=True)

    def start(self, name: str, *args: str) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "wb") as fh:
            popen = subprocess.Popen(fedtune_cmd(*args), stdout=fh, stderr=subprocess.STDOUT,
                                     cwd=self.root, env=env(), start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def server(self, name: str, *extra: str) -> Proc:
        return self.start(
            name, "server", "--certs", "certs", "--state-dir", "coordinator",
            "--fleet-address", f"127.0.0.1:{self.fleet}", "--control-port", str(self.control),
            "--timeout", str(DEADLINE),
            *[x for s in [*SETTINGS, "output.dir=runs", f"output.run_name={RUN}",
                          "data.eval=data/eval.jsonl"] for x in ("--set", s)],
            *extra,
        )

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / RUN

    def ledger(self, site: str, table: str = "rounds") -> list[tuple[int, float]]:
        """(round, recorded_at) rows of this run in a site's ledger, read without creating it."""
        path = self.root / "state" / site / "privacy_ledger.sqlite"
        if not path.exists():
            return []
        try:
            with sqlite3.connect(path, timeout=30) as db:
                return [(int(r), float(t)) for r, t in db.execute(
                    f"SELECT round, recorded_at FROM {table} WHERE run_id = ? "
                    "ORDER BY recorded_at", (RUN,))]
        except sqlite3.OperationalError:  # the schema is being created right now
            return []

    def serverapp_log(self) -> str:
        """The ServerApp's log lines (SecAgg+ stages, dropouts) as the SuperLink keeps them."""
        path = self.root / "coordinator" / "superlink.db"
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
                return "".join(str(x) for (x,) in db.execute(
                    "SELECT log FROM task_logs ORDER BY timestamp"))
        except sqlite3.Error as e:
            return f"(no ServerApp log: {e})"

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]

    def wait(self, what: str, cond, timeout: float = 240, poll: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.text()[-2500:]}" for p in self.procs)
                pytest.fail(f"timed out waiting for: {what}\n{logs}")
            time.sleep(poll)
        self.mark(what)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_site(proc: Proc) -> None:
    """SIGKILL a site daemon and every SuperNode session it started (with their ClientApps)."""
    supernodes = [e["pid"] for e in proc.events() if e["event"] == "supernode_started"]
    for pgid in [proc.popen.pid, *supernodes]:
        _killpg(pgid)
    proc.popen.wait(timeout=30)


@pytest.fixture
def scenario(tmp_path: Path):
    from fedtune.cli.deploy import write_demo_data
    from fedtune.common.config import load_config

    root = tmp_path
    for args in (["init"], ["server", "--host", "127.0.0.1"], *[["site", s] for s in SITES]):
        res = subprocess.run(fedtune_cmd("certs", *args, "--dir", "certs"), cwd=root, env=env(),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
    write_demo_data(load_config(None, SETTINGS), root / "data")
    sc = Scenario(root)
    for site in SITES:
        _site_toml(root, site, sc.fleet, free_port())
    try:
        yield sc
    finally:
        for proc in reversed(sc.procs):
            proc.kill()
        time.sleep(1)
        leftover = [p for p in (sc.fleet, sc.control) if listening(p)]
        assert not leftover, f"ports still open after cleanup: {leftover}"


def test_site_killed_mid_round_then_coordinator_killed_and_resumed(scenario: Scenario):
    sc = scenario
    server = sc.server("server")
    sites = {s: sc.start(s, "client", "--config", f"{s}.toml") for s in SITES}
    sc.mark("coordinator and 3 sites started")

    # 1. site-2 dies while it trains round 1 (its spend is already in its ledger). Training
    # takes a fraction of a second after the spend is recorded: poll fast.
    sc.wait("site-2 trains round 1", lambda: any(r == 1 for r, _ in sc.ledger("site-2")),
            poll=0.05)
    kill_site(sites["site-2"])
    sc.mark("site-2 killed (SIGKILL)")
    # The site records (fsync) what leaves it before it replies: no payload row, no update sent.
    # Should the kill still have come after the reply, the round may include site-2's update.
    site2_sent_r1 = any(r == 1 for r, _ in sc.ledger("site-2", "payloads"))
    sites["site-2"] = sc.start("site-2-restarted", "client", "--config", "site-2.toml")
    sc.wait("round 1 completed", lambda: any(m["round"] == 1 for m in sc.metrics()))
    r1 = next(m for m in sc.metrics() if m["round"] == 1)
    r1_sites = sorted(s["site_id"] for s in r1["sites"])
    why = f"round 1: {r1}\nServerApp log:\n{sc.serverapp_log()[-3000:]}"
    if site2_sent_r1:
        sc.mark("site-2's round-1 update had already left when it was killed")
        assert {"site-0", "site-1"} <= set(r1_sites), why
    else:
        assert r1_sites == ["site-0", "site-1"], why
    assert all(s["status"] == "ok" for s in r1["sites"]), why
    # The round's record and the coordinator's round line name who took part and who dropped
    # out, and why (server/participation.py)
    taken = r1["participation"]
    assert taken["trained"] == r1_sites and not taken["declined"] and not taken["refused"], why
    if not site2_sent_r1:
        assert list(taken["dropped"]) == ["site-2"], why
        assert "no reply" in taken["dropped"]["site-2"] or "Unavailable" in \
            taken["dropped"]["site-2"], why
        def console() -> str:  # the coordinator's console, rich's line wrapping undone
            return " ".join(server.text().split())

        sc.wait("round 1's line names the dropout",
                lambda: "dropped: site-2 (" in console(), timeout=30)
        line = console()[console().index("round 1:"):][:600]
        assert "dropped: site-2 (" in line.partition("round 2:")[0], line

    # 2. site-2 is back for round 2; the coordinator dies in the middle of it.
    sc.wait("site-2 trains round 2", lambda: any(r == 2 for r, _ in sc.ledger("site-2")))
    _killpg(server.popen.pid)
    server.popen.wait(timeout=30)
    sc.mark("coordinator killed (SIGKILL, whole process group)")
    sc.wait("coordinator ports closed",
            lambda: not listening(sc.fleet) and not listening(sc.control), timeout=60)
    assert [m["round"] for m in sc.metrics()] == [0, 1]  # round 2 never completed
    from fedtune.server.state import load_state

    state = load_state(sc.run_dir)
    assert state is not None and (state.run_id, state.round, state.adapter_round) == (RUN, 1, 1)
    resumed_at = time.time()

    # 3. Resume.
    resumed = sc.server("server-resumed", "--resume")
    try:
        resumed.popen.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail("the resumed coordinator did not finish:\n" + resumed.text()[-4000:])
    sc.mark("resumed run finished")
    out = resumed.text()
    assert resumed.popen.returncode == 0, out[-4000:]
    assert "rounds 1..1 completed, continuing at round 2" in out
    assert "finished:completed" in out

    metrics = sc.metrics()
    assert [m["round"] for m in metrics] == [0, 1, 2]  # none lost, none repeated
    assert {m["run_id"] for m in metrics} == {RUN}
    r2 = metrics[-1]
    assert sorted(s["site_id"] for s in r2["sites"]) == SITES  # site-2 rejoined
    assert all(s["status"] == "ok" for s in r2["sites"])
    state = load_state(sc.run_dir)
    assert state is not None and (state.run_id, state.round, state.adapter_round) == (RUN, 2, 2)
    ckpts = sorted(p.name for p in (sc.run_dir / "checkpoints").iterdir())
    assert ckpts == ["round-0001", "round-0002"]  # no temporary directory left behind
    assert (sc.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    server_log = (sc.run_dir / "server.log").read_text()
    assert "[RESUME] continuing at round 2" in server_log
    # One log per run across the restart: the first coordinator's rounds, then the resumed
    # one's (appended, never truncated); plain text; each line once.
    before, _, after = server_log.partition("[RESUME] continuing at round 2")
    assert "[ROUND 1]" in before and "[ROUND 2]" in after, server_log[-3000:]
    assert server_log.count("==== fedtune server") == 2, server_log[:3000]
    assert "resumed: rounds 1..1 completed before" in server_log
    assert "\x1b[" not in server_log
    lines = [x for x in server_log.splitlines() if x.strip()]
    doubled = [a for a, b in zip(lines, lines[1:], strict=False) if a == b]
    assert not doubled, doubled[:5]
    # The wait for sessions from before the restart names sites, not node ids
    waited = [x for x in out.splitlines() if x.startswith("waiting for")]
    assert all("node " not in x for x in waited), waited
    assert r2["participation"] == {"trained": SITES, "declined": {}, "refused": {},
                                   "dropped": {}}

    # Ledgers: every round a site trained is there, the interrupted attempts included.
    for site in SITES:
        rounds = sc.ledger(site)
        trained = [r for r, _ in rounds]
        assert trained == sorted(trained) and set(trained) <= {1, 2}, (site, trained)
        assert 1 in trained
        assert any(r == 2 and t > resumed_at for r, t in rounds), (site, rounds)  # the retry
        sent = {r for r, _ in sc.ledger(site, "payloads")}
        aggregated = {m["round"] for m in metrics[1:]
                      if site in {s["site_id"] for s in m["sites"]}}
        assert aggregated <= sent  # what reached the aggregate left the site on record
        with sqlite3.connect(sc.root / "state" / site / "privacy_ledger.sqlite") as db:
            assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    # site-2 spent in round 1 although its update never reached the aggregate (over-count).
    assert 1 in {r for r, _ in sc.ledger("site-2")}
    assert site2_sent_r1 or "site-2" not in r1_sites
    print("timeline:", sc.timeline)
