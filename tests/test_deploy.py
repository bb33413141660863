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
# site-2 is an auditor: secret gradient canaries in its DP sum ([audit] in its site.toml)
AUDITOR_SITE, AUDITOR_TOML = "site-2", "[audit]\nwhite_box_canaries = 200\n"
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
        _site_toml(root, site, fleet, free_port(),
                   extra=AUDITOR_TOML if site == AUDITOR_SITE else "")
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
    # The site says why in words (not only "Connection attempt failed, retrying..."), and what
    # to set
    address = f"127.0.0.1:{deployment.fleet_port}"
    why = next(e for e in events if e["event"] == "tls_mismatch")["msg"]
    assert f"the coordinator at {address} requires TLS" in why, why
    assert "remove --insecure" in why and "coordinator.root_certificate" in why
    assert next(e for e in events if e["event"] == "giving_up")["cause"] == why
    # The coordinator refused it inside gRPC's TLS layer; it says so from gRPC's log line
    log = deployment.root / "coordinator" / "logs" / "superlink.log"
    assert "WRONG_VERSION_NUMBER" in log.read_text(errors="replace")
    deadline = time.monotonic() + 20  # the coordinator reads its SuperLink's log every 3 s
    while "plaintext connection attempt(s)" not in deployment.server.text():
        assert time.monotonic() < deadline, deployment.server.text()[-3000:]
        time.sleep(0.5)

    # A site whose CA is not the one that signed the coordinator's certificate: said in words
    subprocess.run(fedtune_cmd("certs", "init", "--dir", "other-ca"), cwd=deployment.root,
                   env=env(), capture_output=True, check=True, timeout=60)
    path = _site_toml(deployment.root, "foreign-ca", deployment.fleet_port, free_port(),
                      key_site="site-1")
    path.write_text(path.read_text().replace("certs/ca.crt", "other-ca/ca.crt"))
    res = subprocess.run(
        fedtune_cmd("client", "--config", "foreign-ca.toml", "--max-restarts", "0"),
        cwd=deployment.root, env=env(), capture_output=True, text=True, timeout=120,
    )
    events = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert res.returncode != 0 and "connected" not in [e["event"] for e in events]
    why = next(e for e in events if e["event"] == "tls_mismatch")["msg"]
    assert "its certificate is not signed by your CA" in why, why
    assert "coordinator.root_certificate" in why and "other-ca/ca.crt" in why


def test_status_names_the_expected_sites_while_the_run_goes_on(ready: Deployment):
    """`fedtune status` on the coordinator's run directory during the run: the live part
    (status.json, written by `fedtune server`) names the registered sites."""
    res = subprocess.run(fedtune_cmd("status", str(ready.run_dir), "--json"), cwd=ready.root,
                         env=env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["run_id"] == RUN and data["rounds"] == 2 and data["flower_run_id"]
    assert [s["site_id"] for s in data["sites"] if s["expected"]] == SITES
    assert data["state"] in ("running", "finished")
    if not data["finished"]:
        assert "round" in data["waiting_for"]


# ---------------------------------------------------------------------------------------------
# The run.


def test_run_completes_with_adapter_and_site_epsilons(finished: Deployment):
    out = finished.server.text()
    assert finished.server.popen.returncode == 0, out[-4000:]
    assert "finished:completed" in out and "secure aggregation on (SecAgg+)" in out
    run_dir = finished.run_dir
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    # Every round names the sites that took part (and, here, that none dropped out)
    for r in records[1:]:
        assert r["participation"] == {"trained": SITES, "declined": {}, "refused": {},
                                      "dropped": {}}, r
    # server.log: plain text, each line once, one header for the one start
    server_log = (run_dir / "server.log").read_text()
    assert "[ROUND 2]" in server_log and "\x1b[" not in server_log
    assert server_log.count("==== fedtune server") == 1
    lines = [x for x in server_log.splitlines() if x.strip()]
    assert not [a for a, b in zip(lines, lines[1:], strict=False) if a == b]

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


def test_status_and_run_level_report_after_the_run(finished: Deployment):
    """`fedtune status` (coordinator run directory, JSON and table; one site's ledger) and the
    run-level `fedtune report` of the coordinator's run directory, against metrics.jsonl and
    the site's ledger."""
    from typer.testing import CliRunner

    from fedtune.cli.main import app
    from fedtune.common.ledger import PrivacyLedger

    assert finished.server.popen.returncode == 0
    run_dir = finished.run_dir
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reported = {s["site_id"]: s["epsilon"] for s in records[-1]["sites"]}

    def status(*args: str) -> subprocess.CompletedProcess:
        res = subprocess.run(fedtune_cmd("status", *args), cwd=finished.root, env=env(),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        return res

    data = json.loads(status(str(run_dir), "--json").stdout)
    assert (data["run_id"], data["rounds"], data["last_round"]) == (RUN, 2, 2)
    assert data["finished"] and data["state"] == "finished" and data["waiting_for"] is None
    assert data["connected"] == SITES  # as the SuperLink listed them at the end of the run
    sites = {s["site_id"]: s for s in data["sites"]}
    assert sorted(sites) == SITES
    for site in SITES:
        s = sites[site]
        assert s["expected"] and s["last_seen"] and s["rounds_trained"] == 2
        assert s["reported_epsilon"] == pytest.approx(reported[site]) and s["epsilon_round"] == 2
    table = status(str(run_dir)).stdout
    assert "round 2 of 2 completed" in table and "finished" in table
    assert all(site in table for site in SITES) and "reported by each site" in table

    # One site's ledger, in-process (the test already holds PyTorch, which the ledger needs).
    cli = CliRunner()
    ledger = finished.state("site-0") / PrivacyLedger.FILENAME
    res = cli.invoke(app, ["status", str(ledger), "--json"])
    assert res.exit_code == 0, res.output
    (site,) = json.loads(res.output)["sites"]
    (run,) = site["runs"]
    rows = PrivacyLedger(finished.state("site-0"), "site-0").rows(RUN)
    assert (site["site_id"], run["run_id"], run["rounds_trained"], run["last_round"]) == (
        "site-0", RUN, 2, 2)
    assert run["epsilon"] == pytest.approx(rows[-1].epsilon_run) and run["retried"] == {}
    assert run["epsilon"] == pytest.approx(reported["site-0"])

    # The coordinator has no ledger: `fedtune report` gives the run-level report.
    res = cli.invoke(app, ["report", str(run_dir), "--no-pdf"])
    assert res.exit_code == 0, res.output
    out = run_dir / "report"
    page, md = (out / "run_report.html").read_text(), (out / "run_report.md").read_text()
    report = json.loads((out / "run_report.json").read_text())
    assert [r["took_part"] for r in report["rounds"] if r["round"] > 0] == [SITES, SITES]
    for text in (page, md):
        assert "REPORTED" in text and "source of truth" in text
        assert ", ".join(SITES) in text
        assert f"{reported['site-0']:.4g}" in text


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


def test_deployed_auditor_site_audits_its_own_run(finished: Deployment):
    """An auditor site in a real deployment: its canaries (secret, at the site) went into its DP
    sums; `fedtune audit --site` states a lower bound below its ledger's ε and writes it."""
    assert finished.server.popen.returncode == 0
    audit_dir = finished.state(AUDITOR_SITE) / "audit" / RUN
    spec = json.loads((audit_dir / "canaries.json").read_text())
    assert len(spec["included"]) == 200 and 40 < sum(spec["included"]) < 160
    observed = [json.loads(x) for x in (audit_dir / "observations.jsonl").read_text().splitlines()]
    assert {o["round"] for o in observed} == {1, 2} and sum(o["participations"] for o in observed)
    res = subprocess.run(fedtune_cmd("audit", "--site", f"{AUDITOR_SITE}.toml", "--run", RUN),
                         cwd=finished.root, env=env(), capture_output=True, text=True, timeout=120)
    out = res.stdout.replace("\n", " ")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "audited lower bound" in out and "200 canaries" in out
    result = json.loads((audit_dir / "audit.json").read_text())
    assert result["m"] == 200 and result["passed"] and result["accountant_epsilon"] > 0
    assert 0 <= result["lower_bound"] <= result["accountant_epsilon"]
    # The secret stays at the site: nothing the coordinator keeps names the canaries.
    for path in [p for d in (finished.root / "coordinator", finished.run_dir)
                 for p in d.rglob("*") if p.is_file()]:
        assert b"coordinate_seed" not in path.read_bytes(), path
    # Without a run that has observations: a clear error naming what is missing.
    bad = subprocess.run(fedtune_cmd("audit", "--site", f"{AUDITOR_SITE}.toml", "--run", "nope"),
                         cwd=finished.root, env=env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "no canary observations for run 'nope'" in bad.stderr.replace("\n", " ")
