"""A real deployment on 127.0.0.1: `fedtune server` (a Flower SuperLink with TLS and SuperNode
authentication) and three `fedtune client` site daemons (real SuperNodes), 2 rounds of DP-LoRA
on the embedded MiniLM classifier with SecAgg+. No mocks: real processes, real gRPC, real
Opacus/PEFT. Every process runs in its own session and is killed (group-wide) at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tomllib

pytestmark = pytest.mark.slow

SITES = ["site-0", "site-1", "site-2"]
RUN = "deploy-run"
SETTINGS = [
    "model.name=all-minilm-l6-v2",
    "model.max_length=32",
    "train.local_steps=2",
    "train.batch_size=4",
    "train.threads=1",
    "federation.num_sites=3",
    "federation.rounds=2",
    "federation.secagg_max_records=100",
    "data.demo_records=120",
    "data.max_eval_records=16",
    "dp.target_epsilon=8.0",
]
SITE0_EPSILON = 4.0  # site-0's own budget (site.toml [privacy]) overrides the run's 8.0
RUN_TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def fedtune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtune", *args]


def env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "ignore",
            "PYTHONUNBUFFERED": "1"}


@dataclass
class Proc:
    """A process in its own session; `kill` takes down everything it started."""

    name: str
    popen: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def events(self) -> list[dict]:
        out = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def kill(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                continue
        # the group may outlive its leader (a SuperNode's SuperExec): make sure it is gone
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Deployment:
    root: Path
    fleet_port: int
    control_port: int
    server: Proc
    sites: dict[str, Proc]
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, *args: str) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        fh = open(log, "wb")
        popen = subprocess.Popen(fedtune_cmd(*args), stdout=fh, stderr=subprocess.STDOUT,
                                 cwd=self.root, env=env(), start_new_session=True)
        fh.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / RUN

    def state(self, site: str) -> Path:
        return self.root / "state" / site


def _site_toml(root: Path, site: str, fleet_port: int, runtime_port: int, *,
               key_site: str | None = None, extra: str = "") -> Path:
    key_site = key_site or site
    path = root / f"{site}.toml"
    privacy = f"[privacy]\ntarget_epsilon = {SITE0_EPSILON}\n" if site == "site-0" else ""
    path.write_text(
        f'site_id = "{site}"\n'
        f'data = "data/{site if site in SITES else "site-0"}/train.jsonl"\n'
        f'state_dir = "state/{site}"\n'
        "keep_update_copies = true\n"
        "threads = 1\n"
        f"{extra}"
        "[coordinator]\n"
        f'address = "127.0.0.1:{fleet_port}"\n'
        'root_certificate = "certs/ca.crt"\n'
        "[auth]\n"
        f'private_key = "certs/sites/{key_site}/site.key"\n'
        f"{privacy}"
        "[daemon]\n"
        f"runtime_port = {runtime_port}\n"
        "link_timeout_s = 8\n"
        "initial_backoff_s = 1\n"
        "max_backoff_s = 4\n"
        "stop_timeout_s = 20\n"
    )
    return path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Deployment:
    from fedtune.cli.deploy import write_demo_data
    from fedtune.common.config import load_config

    root = tmp_path_factory.mktemp("deploy")
    for args in (["init"], ["server", "--host", "127.0.0.1"],
                 *[["site", s] for s in SITES], ["site", "rogue"]):
        res = subprocess.run(fedtune_cmd("certs", *args, "--dir", "certs"), cwd=root, env=env(),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
    # `rogue` has a key pair, but the coordinator never registered it.
    (root / "certs" / "registry" / "rogue.pub").unlink()
    write_demo_data(load_config(None, SETTINGS), root / "data")

    fleet, control = free_port(), free_port()
    for site in SITES:
        _site_toml(root, site, fleet, free_port())
    dep = Deployment(root, fleet, control, server=None, sites={})  # type: ignore[arg-type]
    try:
        dep.server = dep.start(
            "server", "server", "--certs", "certs", "--state-dir", "coordinator",
            "--fleet-address", f"127.0.0.1:{fleet}", "--control-port", str(control),
            "--timeout", str(RUN_TIMEOUT),
            *[x for s in [*SETTINGS, "output.dir=runs", f"output.run_name={RUN}",
                          "data.eval=data/eval.jsonl"] for x in ("--set", s)],
        )
        for site in SITES:
            dep.sites[site] = dep.start(site, "client", "--config", f"{site}.toml")
        yield dep
    finally:
        for proc in reversed(dep.procs):
            proc.kill()
        time.sleep(1)
        leftover = [p for p in (fleet, control) if listening(p)]
        assert not leftover, f"ports still open after cleanup: {leftover}"


@pytest.fixture(scope="module")
def ready(deployment: Deployment) -> Deployment:
    """The SuperLink is up, the site keys are registered and the run is submitted."""
    deadline = time.monotonic() + 240
    while "submitted" not in deployment.server.text():
        if deployment.server.popen.poll() is not None or time.monotonic() > deadline:
            pytest.fail("the coordinator did not start:\n" + deployment.server.text()[-4000:])
        time.sleep(0.5)
    return deployment


@pytest.fixture(scope="module")
def finished(deployment: Deployment) -> Deployment:
    try:
        deployment.server.popen.wait(timeout=RUN_TIMEOUT + 60)
    except subprocess.TimeoutExpired:
        pytest.fail("the deployment did not finish:\n" + deployment.server.text()[-4000:])
    return deployment


# ---------------------------------------------------------------------------------------------
# Refusals (while the real run is going on).


def test_unregistered_key_is_refused(ready: Deployment):
    deployment = ready
    _site_toml(deployment.root, "rogue", deployment.fleet_port, free_port())
    res = subprocess.run(fedtune_cmd("client", "--config", "rogue.toml", "--max-restarts", "0"),
                         cwd=deployment.root, env=env(), capture_output=True, text=True,
                         timeout=120)
    events = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    kinds = [e["event"] for e in events]
    assert res.returncode == 3, res.stdout[-3000:] + res.stderr[-2000:]
    assert "refused" in kinds and "connected" not in kinds
    # The site's log says in words what a refusal means (it cannot tell "not yet" from
    # "unknown") and that, with --max-restarts 0, it does not retry.
    hint = next(e for e in events if e["event"] == "refused")["hint"]
    assert "is not registered at the coordinator" in hint
    assert "not yet" in hint and "not at all" in hint and "does not retry" in hint
    log = (deployment.root / "coordinator" / "logs" / "superlink.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in log


def test_plaintext_client_is_refused_by_tls_server(ready: Deployment):
    deployment = ready
    _site_toml(deployment.root, "plain", deployment.fleet_port, free_port(), key_site="site-1")
    res = subprocess.run(
        fedtune_cmd("client", "--config", "plain.toml", "--insecure", "--max-restarts", "0"),
        cwd=deployment.root, env=env(), capture_output=True, text=True, timeout=120,
    )
    events = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    kinds = [e["event"] for e in events]
    assert res.returncode != 0
    assert "WARNING" in res.stderr and "PLAINTEXT" in res.stderr  # the loud warning
    assert "insecure" in kinds and "disconnected" in kinds and "connected" not in kinds


# ---------------------------------------------------------------------------------------------
# The run.


def test_run_completes_with_adapter_and_site_epsilons(finished: Deployment):
    out = finished.server.text()
    assert finished.server.popen.returncode == 0, out[-4000:]
    assert "finished:completed" in out and "secure aggregation on (SecAgg+)" in out
    run_dir = finished.run_dir
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]

    # Each site's ledger holds both rounds; the metrics show its epsilon; site-0's own budget
    # (4.0, from its site.toml) is respected and below the others' (run target 8.0).
    from fedtune.common.ledger import PrivacyLedger

    final = {s["site_id"]: s for s in records[-1]["sites"]}
    assert sorted(final) == SITES
    for site in SITES:
        rows = PrivacyLedger(finished.state(site), site).rows(RUN)
        assert [r.round for r in rows] == [1, 2]
        eps = rows[-1].epsilon_run
        assert 0 < eps <= (SITE0_EPSILON if site == "site-0" else 8.0) * 1.001
        assert final[site]["status"] == "ok"
        assert final[site]["epsilon"] == pytest.approx(eps)
    assert final["site-0"]["epsilon"] < final["site-1"]["epsilon"]

    # The final adapter loads with PEFT, and differs from the initial one (LoRA B starts at 0).
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedtune.common.models import resolve_model_path

    adapter = run_dir / "adapter"
    tensors = load_file(adapter / "adapter_model.safetensors")
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]
    assert lora_b and all(np.abs(b).max() > 0 for b in lora_b)
    round1 = load_file(run_dir / "checkpoints" / "round-0001" / "adapter_model.safetensors")
    assert any(not np.array_equal(round1[k], tensors[k]) for k in tensors)

    labels = len(tomllib.loads((run_dir / "config.toml").read_text())["data"]["labels"])
    path = resolve_model_path("all-minilm-l6-v2")
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=labels)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(["my card was declined at the shop"], return_tensors="pt")
    with torch.no_grad():
        before = base(**ids).logits.clone()
        tuned = PeftModel.from_pretrained(base, adapter)
        after = tuned(**ids).logits
    assert not torch.allclose(before, after)


def _adapter_arrays(run_dir: Path, name: str, model) -> list[np.ndarray]:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.numpy import load_file

    from fedtune.common.lora import get_adapter

    sd = load_file(run_dir / "checkpoints" / name / "adapter_model.safetensors")
    set_peft_model_state_dict(model, {k: torch.from_numpy(v) for k, v in sd.items()})
    return get_adapter(model)


def test_secagg_aggregate_equals_plain_and_server_holds_no_site_delta(finished: Deployment):
    """Round 2's global step, computed by SecAgg+ from masked updates, equals the example-
    weighted mean of the sites' own copies of what they sent, within the quantization error; and
    no individual delta (nor a site's local model) appears in any file the coordinator keeps."""
    from fedtune.common.config import load_config
    from fedtune.common.model_cache import get_runtime
    from fedtune.common.tasks import num_labels, resolve_task
    from fedtune.server.secagg import aggregate_error_bound, secagg_params

    assert finished.server.popen.returncode == 0
    run_dir = finished.run_dir
    cfg = load_config(run_dir / "config.toml")
    task = resolve_task(cfg)
    model = get_runtime(cfg, task, num_labels(cfg, task)).model
    g1 = _adapter_arrays(run_dir, "round-0001", model)
    g2 = _adapter_arrays(run_dir, "round-0002", model)

    sent = {s: np.load(finished.state(s) / "sent" / RUN / "round-0002.npz") for s in SITES}
    n = {s: int(f["num_examples"]) for s, f in sent.items()}
    deltas = {s: [f[f"t{i:03d}"] for i in range(len(g1))] for s, f in sent.items()}
    plain = [sum(n[s] * deltas[s][i] for s in SITES) / sum(n.values()) for i in range(len(g1))]
    secure = [b.astype(np.float64) - a for a, b in zip(g1, g2, strict=True)]

    params = secagg_params(3, clip=cfg.federation.secagg_clip,
                           max_records=cfg.federation.secagg_max_records)
    bound = aggregate_error_bound(params, list(n.values()))
    # the checkpoints are float32: add their rounding (2 ulps of the largest weight)
    ulp = 2 * float(np.spacing(np.float32(max(np.abs(a).max() for a in g2))))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(secure, plain, strict=True))
    step = max(float(np.abs(p).max()) for p in plain)
    print(f"\nSecAgg+ vs plain aggregate (round 2): max |diff| = {diff:.3g} "
          f"(bound {bound:.3g} + float32 {ulp:.3g}); largest aggregate coordinate {step:.3g}")
    assert step > 100 * (bound + ulp)  # the comparison is meaningful: the step is not noise
    assert diff <= bound + ulp
    # no delta was clipped by SecAgg+'s fixed-point encoding
    peak = max(float(np.abs(d).max()) for ds in deltas.values() for d in ds)
    assert peak * max(n.values()) / params["max_weight"] < params["clipping_range"]

    # Needles: 16 consecutive float32 values of each site's largest delta tensor, and of its
    # local model (global + delta). Searched in every file the coordinator wrote.
    needles = {}
    for s in SITES:
        i = int(np.argmax([d.size for d in deltas[s]]))
        flat = deltas[s][i].ravel()
        j = int(np.argmax(np.abs(flat) > 0))
        needles[f"{s} delta"] = flat[j:j + 16].astype(np.float32).tobytes()
        needles[f"{s} local model"] = (g1[i].ravel()[j:j + 16] + flat[j:j + 16]).astype(
            np.float32).tobytes()
    own = (finished.state("site-0") / "sent" / RUN / "round-0002.npz").read_bytes()
    assert needles["site-0 delta"] in own  # the search does find a delta where one is stored
    server_files = [p for d in (finished.root / "coordinator", run_dir) for p in d.rglob("*")
                    if p.is_file()]
    assert any(p.name == "superlink.db" for p in server_files)
    for path in server_files:
        data = path.read_bytes()
        for what, needle in needles.items():
            assert needle not in data, f"{what} found in {path}"
    server_log = (run_dir / "server.log").read_text()  # the ServerApp's log, from the SuperLink
    assert "Secure aggregation completed" in server_log


# ---------------------------------------------------------------------------------------------
# The daemons after the run: reconnect when the coordinator comes back, stop on SIGTERM.


def test_site_daemons_reconnect_after_coordinator_restart(finished: Deployment):
    from fedtune.server.coordinator import Coordinator, CoordinatorOptions

    def connects(site: str) -> int:
        # "connected": a SuperNode (re)started and registered; "connection_ok": a running
        # SuperNode's retried call went through to the (new) SuperLink.
        return sum(e["event"] in ("connected", "connection_ok")
                   for e in finished.sites[site].events())

    before = {s: connects(s) for s in SITES}
    assert all(v >= 1 for v in before.values())
    # The coordinator is gone: each daemon notices and backs off.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not all(
        any(e["event"] == "reconnecting" for e in finished.sites[s].events()) for s in SITES
    ):
        time.sleep(1)
    for s in SITES:
        events = finished.sites[s].events()
        backoffs = [e for e in events if e["event"] == "reconnecting"]
        assert backoffs, f"{s} did not notice the coordinator going away"
        assert all(e["in_s"] <= 4 for e in backoffs)

    # Restart the SuperLink on the same state (its database keeps the registered keys).
    coord = Coordinator(CoordinatorOptions(
        certs_dir=finished.root / "certs", state_dir=finished.root / "coordinator",
        fleet_address=f"127.0.0.1:{finished.fleet_port}", control_port=finished.control_port,
    ))
    try:
        coord.start_superlink()
        # Flower lists a killed site as online for up to 2 x 30 s heartbeats, then the daemon's
        # backoff adds its wait: passes in ~50 s on an idle 2-core machine, seen > 120 s under
        # heavy CPU contention. The loop stops as soon as every site has reconnected.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not all(
            connects(s) > before[s] for s in SITES
        ):
            time.sleep(1)
        assert all(connects(s) > before[s] for s in SITES), {
            s: [e["event"] for e in finished.sites[s].events()][-8:] for s in SITES
        }
    finally:
        coord.stop()


def test_site_daemon_stops_cleanly_on_sigterm(finished: Deployment):
    for proc in finished.sites.values():
        if proc.popen.poll() is None:
            os.kill(proc.popen.pid, signal.SIGTERM)
    for site, proc in finished.sites.items():
        assert proc.popen.wait(timeout=60) == 0, proc.text()[-2000:]
        events = proc.events()
        assert events[-1]["event"] == "stopped"
        assert any(e["event"] == "stopping" and e["signal"] == "SIGTERM" for e in events)
        # every line the daemon wrote is a JSON object naming the site
        lines = [x for x in proc.text().splitlines() if x.strip()]
        assert all(json.loads(x)["site"] == site for x in lines)
    time.sleep(2)
    for proc in finished.sites.values():
        # the daemon's session and those of every SuperNode it started are empty
        groups = [proc.popen.pid] + [e["pid"] for e in proc.events()
                                     if e["event"] == "supernode_started"]
        for pgid in groups:
            with pytest.raises(ProcessLookupError):
                os.killpg(pgid, 0)
    # the ledger is intact and readable after the stop
    from fedtune.common.ledger import PrivacyLedger

    assert len(PrivacyLedger(finished.state("site-1"), "site-1").rows(RUN)) == 2
