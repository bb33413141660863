"""Start-up order of a real deployment on 127.0.0.1 (helpers of test_deploy.py): three
`fedtune client` site daemons (real SuperNodes) are started BEFORE `fedtune server` (a real
SuperLink with TLS and SuperNode authentication). The coordinator registers the site keys before
its Fleet API opens, so no site is refused on the way in, and the SuperLink never logs "No
SuperNode found with the given public key" for a registered site. Every process runs in its
own session and is killed (group-wide) at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_deploy import SITES, Proc, _site_toml, env, fedtune_cmd, free_port, listening

pytestmark = pytest.mark.slow

RUN = "startup-run"
SETTINGS = [
    "model.name=all-minilm-l6-v2",
    "model.max_length=32",
    "train.local_steps=1",
    "train.batch_size=4",
    "train.threads=1",
    "federation.num_sites=3",
    "federation.rounds=1",
    "federation.secagg_max_records=100",
    "data.demo_records=120",
    "data.max_eval_records=16",  # all labels in the eval file: else sites fail
]
DEADLINE = 85  # seconds, from the first daemon's start until every site is connected


class SitesFirst:
    """Certificates, demo data and site.toml files in `root`; `start()` launches the three
    site daemons and, right after them, `fedtune server` (extra `--set`s: `settings`)."""

    def __init__(self, root: Path, settings: list[str] = SETTINGS) -> None:
        from fedtune.cli.deploy import write_demo_data
        from fedtune.common.config import load_config
        from fedtune.server.certs import create_site_key, init_ca, issue_server_cert

        self.root, self.settings = root, settings
        certs = root / "certs"
        init_ca(certs)
        issue_server_cert(certs, ["127.0.0.1"])
        for site in SITES:
            create_site_key(certs, site)  # also registers certs/registry/<site>.pub
        write_demo_data(load_config(None, settings), root / "data")
        self.fleet, self.control = free_port(), free_port()
        for site in SITES:
            _site_toml(root, site, self.fleet, free_port())
        self.procs: list[Proc] = []
        self.sites: dict[str, Proc] = {}
        self.server: Proc | None = None

    def _spawn(self, name: str, *args: str) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "wb") as fh:
            popen = subprocess.Popen(fedtune_cmd(*args), stdout=fh, stderr=subprocess.STDOUT,
                                     cwd=self.root, env=env(), start_new_session=True)
        self.procs.append(Proc(name, popen, log))
        return self.procs[-1]

    def start(self) -> Proc:
        # The sites first, the coordinator right after them (as an operator's scripts or a
        # compose file without depends_on would).
        self.sites = {s: self._spawn(s, "client", "--config", f"{s}.toml") for s in SITES}
        self.server = self._spawn(
            "server", "server", "--certs", "certs", "--state-dir", "coordinator",
            "--fleet-address", f"127.0.0.1:{self.fleet}", "--control-port", str(self.control),
            "--timeout", "300",
            *[x for s in [*self.settings, "output.dir=runs", f"output.run_name={RUN}",
                          "data.eval=data/eval.jsonl"] for x in ("--set", s)],
        )
        return self.server

    def superlink_log(self) -> str:
        return (self.root / "coordinator" / "logs" / "superlink.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs:  # all at once: SIGTERM to every session, then wait, then make sure
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)
            proc.kill()
        time.sleep(1)
        assert not [p for p in (self.fleet, self.control) if listening(p)], \
            "ports still open after cleanup"


def test_sites_started_before_the_coordinator_are_not_refused(tmp_path: Path):
    dep = SitesFirst(tmp_path)
    t0 = time.monotonic()
    try:
        server = dep.start()
        sites = dep.sites

        def connected(site: str) -> bool:
            return any(e["event"] == "connected" for e in sites[site].events())

        while time.monotonic() - t0 < DEADLINE and not all(connected(s) for s in SITES):
            assert server.popen.poll() is None, server.text()[-4000:]
            time.sleep(0.5)
        took = time.monotonic() - t0
        print(f"\nall sites connected {took:.1f} s after the first daemon started")
        assert all(connected(s) for s in SITES), (
            {s: [e["event"] for e in sites[s].events()][-8:] for s in SITES},
            server.text()[-3000:])

        # No site was refused on the way in: registered keys are known before the Fleet API
        # accepts a connection.
        for site in SITES:
            refused = [e for e in sites[site].events() if e["event"] == "refused"]
            assert not refused, f"{site} was refused: {refused}"
        assert "No SuperNode found with the given public key" not in dep.superlink_log()
        out = server.text()
        assert "registered before the Fleet API opened" in out, out[-3000:]
        assert out.index("site key site-0: registered") < out.index("SuperLink: Fleet API")
    finally:
        dep.stop()
