"""`fedtune server`: the coordinator of a real deployment.

1. Prepares the run directory (effective config, the coordinator's held-out evaluation split).
2. Starts a Flower SuperLink: Fleet API over gRPC with TLS and SuperNode authentication (the
   sites connect there, default port 9092), Control/Runtime API over HTTPS on 127.0.0.1:8000.
   Flower's own state (database, installed app bundles, CLI config) lives under the coordinator's
   state directory (`FLWR_HOME`), never in the user's home.
3. Registers every site public key in `<certs>/registry/` with the SuperLink (as
   `flwr supernode register` does, over the Control API) BEFORE the Fleet API opens: a first
   SuperLink on the same database, its Fleet API bound to an ephemeral loopback port that no
   site can reach, takes the registrations and stops; the SuperLink the sites reach then starts
   on that database (Flower keeps registered keys in its sqlite state). A site that starts
   before the coordinator is never refused for a key registered a moment too late; a SuperNode
   whose key is not registered at all is refused.
4. Writes a small Flower app (pyproject.toml whose components are `server.superlink_app:app` and
   `client.supernode_app:app`, run config = the effective fedtune config as JSON) and submits it
   with `flwr run`. The SuperLink runs the ServerApp; the sites' SuperNodes run the ClientApp.
5. Follows the run (Control API) and the round records in `metrics.jsonl` until it finishes,
   then stops the SuperLink.

Secure aggregation (SecAgg+) is on unless the run configuration says `federation.secagg = false`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from fedtune.common.run_layout import RunLayout
from fedtune.server.certs import CertPaths, load_public_key, registered_keys
from fedtune.server.deployment_run import PreparedDeployment, write_flower_app
from fedtune.server.run_log import RunLogFile

CONNECTION = "fedtune"  # name of the SuperLink connection in FLWR_HOME/config.toml


class CoordinatorError(RuntimeError):
    """The coordinator cannot start or the run failed; the message says why."""


@dataclass
class CoordinatorOptions:
    certs_dir: Path = Path("certs")
    state_dir: Path = Path("coordinator-state")
    fleet_address: str = "0.0.0.0:9092"
    control_host: str = "127.0.0.1"
    control_port: int = 8000
    insecure: bool = False
    run_timeout_s: float = 0.0  # 0: no limit
    startup_timeout_s: float = 60.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def control_address(self) -> str:
        return f"{self.control_host}:{self.control_port}"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "logs" / "superlink.log"


# ---------------------------------------------------------------------------------------------
# Processes.


def _bin(name: str) -> str:
    """A console script of this environment (flower-superlink, flwr), found next to Python."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise CoordinatorError(f"`{name}` not found; is Flower installed in this environment?")
    return found


def child_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: FLWR_HOME set, this environment's scripts on PATH
    (the SuperLink/SuperNode start `flower-superexec`, `flwr-serverapp`, `flwr-clientapp`)."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.update(extra or {})
    return env


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the parent dies (Linux), so nothing is orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort, not available everywhere
        pass


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise CoordinatorError(f"process exited with code {proc.returncode} during start-up")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise CoordinatorError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class Coordinator:
    """A SuperLink plus one fedtune run on it."""

    def __init__(self, opts: CoordinatorOptions, say: Callable[[str], None] = print) -> None:
        self.opts = opts
        self.say = say
        self.superlink: subprocess.Popen | None = None
        self._log_fh = None
        self._run_log: RunLogFile | None = None  # run_dir/server.log, appended to
        self._started_at, self._started_wall = time.monotonic(), time.time()
        self.registration_s = 0.0  # start-up time spent registering the keys before the Fleet API
        self.certs = CertPaths(Path(opts.certs_dir))

    # -- configuration checks ----------------------------------------------------------------
    def check(self) -> dict[str, Path]:
        """Fail early, naming the missing file; returns the registered site keys."""
        if self.opts.insecure:
            return {}
        missing = [p for p in (self.certs.ca_cert, self.certs.server_cert, self.certs.server_key)
                   if not p.is_file()]
        if missing:
            raise CoordinatorError(
                "TLS certificate files missing: " + ", ".join(str(p) for p in missing)
                + f"\n  create them with `fedtune certs init --dir {self.certs.root}` and "
                f"`fedtune certs server --host NAME --dir {self.certs.root}`"
                "\n  (plaintext needs the explicit --insecure flag)"
            )
        keys = registered_keys(self.certs.root)
        if not keys:
            raise CoordinatorError(
                f"no site keys registered in {self.certs.registry}; create them with "
                f"`fedtune certs site SITE --dir {self.certs.root}` (or register a site's "
                "public key with `fedtune certs register SITE --public-key site.pub`)"
            )
        return keys

    # -- SuperLink ---------------------------------------------------------------------------
    def _write_flwr_config(self) -> None:
        conn: dict = {"address": self.opts.control_address}
        if self.opts.insecure:
            conn["insecure"] = True
        else:
            conn["root-certificates"] = str(self.certs.ca_cert.resolve())
        home = self.opts.flwr_home
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}})
        )

    def superlink_command(self, fleet_address: str | None = None) -> list[str]:
        """The `flower-superlink` command line; `fleet_address` replaces the sites' address
        (the registration-only SuperLink binds 127.0.0.1:0, an ephemeral loopback port)."""
        o = self.opts
        cmd = [_bin("flower-superlink")]
        if o.insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--ssl-ca-certfile", str(self.certs.ca_cert.resolve()),
                    "--ssl-certfile", str(self.certs.server_cert.resolve()),
                    "--ssl-keyfile", str(self.certs.server_key.resolve()),
                    "--enable-supernode-auth"]
        cmd += [
            "--fleet-api-type", "grpc-rere",
            "--fleet-api-address", fleet_address or o.fleet_address,
            "--host", o.control_host, "--port", str(o.control_port),
            "--database", str((o.state_dir / "superlink.db").resolve()),
            # The app's code is the installed fedtune: never `uv sync` anything at run time.
            "--disable-runtime-dependency-installation",
        ]
        return cmd

    def _spawn_superlink(self, fleet_address: str | None = None) -> subprocess.Popen:
        o = self.opts
        o.state_dir.mkdir(parents=True, exist_ok=True)
        o.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._write_flwr_config()
        if self._log_fh is None:
            self._log_fh = open(o.log_path, "ab")
        # gRPC's default verbosity keeps gRPC's line on a failed TLS handshake, e.g. a plaintext
        # site (server/run_log.py). Flower sets GRPC_VERBOSITY=error in any process that imports
        # it (this one, or the one that started it), which hides that line: "error" is replaced,
        # any other value an operator sets is kept.
        verbosity = os.environ.get("GRPC_VERBOSITY", "")
        grpc_log = {"GRPC_VERBOSITY": "" if verbosity.lower() == "error" else verbosity}
        return subprocess.Popen(
            self.superlink_command(fleet_address), stdout=self._log_fh,
            stderr=subprocess.STDOUT, env=child_env(o.flwr_home, {**grpc_log, **o.extra_env}),
            cwd=o.state_dir,
            preexec_fn=_die_with_parent,
        )

    def start_superlink(self) -> None:
        """Start the SuperLink the sites connect to; returns once both APIs listen."""
        o = self.opts
        self._started_at, self._started_wall = time.monotonic(), time.time()
        self.superlink = self._spawn_superlink()
        fleet_host, _, fleet_port = o.fleet_address.rpartition(":")
        fleet_host = "127.0.0.1" if fleet_host in ("0.0.0.0", "[::]", "") else fleet_host
        try:
            wait_port(o.control_host, o.control_port, o.startup_timeout_s, self.superlink)
            wait_port(fleet_host.strip("[]"), int(fleet_port), o.startup_timeout_s,
                      self.superlink)
        except CoordinatorError as e:
            raise CoordinatorError(f"the SuperLink did not start: {e}; see {o.log_path}") from None

    def start_registered(self, keys: dict[str, Path]) -> dict[str, str]:
        """Register the site keys, then start the SuperLink the sites connect to: no site can
        reach the Fleet API before its key is registered (a site that started first would
        otherwise be refused: "No SuperNode found with the given public key").

        The keys are registered through the Control API of a first SuperLink on the same
        database whose Fleet API is bound to an ephemeral loopback port (127.0.0.1:0), which is
        then stopped; Flower keeps the registrations in the database. Without site
        authentication (--insecure) there is nothing to register."""
        if self.opts.insecure or not keys:
            self.start_superlink()
            return {}
        o = self.opts
        t0 = time.monotonic()
        self.superlink = self._spawn_superlink(fleet_address="127.0.0.1:0")
        try:
            try:
                wait_port(o.control_host, o.control_port, o.startup_timeout_s, self.superlink)
            except CoordinatorError as e:
                raise CoordinatorError(
                    f"the SuperLink did not start (to register the site keys): {e}; "
                    f"see {o.log_path}") from None
            registered = self.register_sites(keys)
        finally:
            stop_process(self.superlink)
            self.superlink = None
        # The Control API port is reused at once: wait until the first SuperLink released it.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _listening(o.control_host, o.control_port):
            time.sleep(0.1)
        self.registration_s = time.monotonic() - t0
        self.start_superlink()
        return registered

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_bin("flwr"), *args], capture_output=True, text=True, timeout=timeout,
            env=child_env(self.opts.flwr_home, self.opts.extra_env), cwd=self.opts.state_dir,
        )

    def register_sites(self, keys: dict[str, Path]) -> dict[str, str]:
        """Register each site's public key with the SuperLink, as `flwr supernode register`
        does, over the Control API from this process (idempotent across restarts: a key
        already in the database is "already registered")."""
        from flwr.proto.control_pb2 import RegisterNodeRequest
        from flwr.supercore.error import ApiErrorCode
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        out = {}
        client = self._control_client()
        try:
            for site_id, pub in keys.items():
                try:
                    key = public_key_to_bytes(load_public_key(pub))
                    res = client.RegisterNode(RegisterNodeRequest(public_key=key, name=site_id))
                except Exception as e:  # noqa: BLE001 - Flower's HTTP client errors, a bad key
                    code, why = _flower_error(e)
                    if code == ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE:
                        out[site_id] = "already registered"
                        continue
                    raise CoordinatorError(
                        f"registering site {site_id!r} ({pub}) failed: {why}") from None
                out[site_id] = f"registered (node {res.node_id})"
        finally:
            client.close()
        return out

    def stale_nodes(self) -> list[str]:
        """Sites the SuperLink lists as online whose last sign of life (activation or heartbeat)
        predates this SuperLink: left over from before a coordinator restart."""
        from flwr.common.constant import HEARTBEAT_PATIENCE

        return [self._node_name(n) for n in self._list_nodes()
                if n.status == "online"
                and n.online_until - HEARTBEAT_PATIENCE * n.heartbeat_interval
                < self._started_wall - 1.0]

    def _list_nodes(self) -> list:
        """The SuperLink's NodeInfo of every registered (or, without authentication, connected)
        SuperNode."""
        from flwr.proto.control_pb2 import ListNodesRequest

        client = self._control_client()
        try:
            return list(client.ListNodes(ListNodesRequest()).nodes_info)
        finally:
            client.close()

    @staticmethod
    def _node_name(n) -> str:
        """The site name a node's key was registered under (`fedtune certs register SITE`)."""
        return n.name or f"node {n.node_id}"

    def site_nodes(self) -> dict[int, str]:
        """{node id: site name} of the registered sites: the ServerApp names a site that drops
        out of a round by it (server/participation.py). Empty without site authentication."""
        if self.opts.insecure:
            return {}
        try:
            return {int(n.node_id): n.name for n in self._list_nodes() if n.name}
        except Exception:  # noqa: BLE001 - without it, dropouts are named by node id
            return {}

    def wait_for_stale_nodes(self, patience_s: float = 65.0, poll_s: float = 2.0) -> None:
        """After a restart, wait until no site is listed online from before it (each has sent a
        heartbeat or re-activated since, or has been marked offline), at most Flower's heartbeat
        patience (2 x 30 s). Otherwise the first round would be sent to SuperNodes that no
        longer exist, and fail when their heartbeat lapses."""
        said = False
        while (up := time.monotonic() - self._started_at) < patience_s:
            try:
                stale = self.stale_nodes()
            except Exception:  # noqa: BLE001 - a transient Control API error: retry
                stale = ["?"]
            if not stale:
                return
            if not said:
                self.say(f"waiting for {len(stale)} site(s) that were online before this restart "
                         f"to reconnect or time out ({', '.join(stale)}; at most "
                         f"{patience_s - up:.0f} s)")
                said = True
            time.sleep(poll_s)

    # -- the run -----------------------------------------------------------------------------
    def submit(self, prepared: PreparedDeployment) -> int:
        prepared.site_nodes = prepared.site_nodes or self.site_nodes()
        app_dir = write_flower_app(self.opts.state_dir / "apps" / prepared.run_name, prepared)
        res = self.flwr("run", str(app_dir.resolve()), CONNECTION, "--format", "json")
        info = _json_tail(res.stdout)
        if not info.get("success") or not info.get("run-id"):
            raise CoordinatorError(
                "`flwr run` failed: "
                f"{info.get('error-message') or res.stderr.strip() or res.stdout.strip()}"
            )
        return int(info["run-id"])

    def _control_client(self):
        """An HTTP client of the SuperLink's Control API (as `flwr` uses it)."""
        from flwr.cli.typing import SuperLinkConnection
        from flwr.cli.utils import init_http_client_from_connection

        os.environ["FLWR_HOME"] = str(self.opts.flwr_home)  # Flower's CLI helpers read it
        conn = SuperLinkConnection(
            name=CONNECTION, address=self.opts.control_address,
            root_certificates=None if self.opts.insecure else str(self.certs.ca_cert.resolve()),
            insecure=self.opts.insecure,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using SuperLink: ..."
            return init_http_client_from_connection(conn)

    def run_status(self, run_id: int) -> str:
        """Flower's status of the run: pending, starting, running, finished:<sub-status>."""
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest

        client = self._control_client()
        try:
            res = client.ListRuns(ListRunsRequest(run_id=run_id))
        finally:
            client.close()
        run = run_from_proto(res.run_dict[run_id])
        st = run.status
        return f"{st.status}:{st.sub_status}" if st.sub_status else st.status

    def follow(self, run_id: int, prepared: PreparedDeployment,
               on_round: Callable[[dict], None], poll_s: float = 3.0,
               on_poll: Callable[[str], None] | None = None) -> str:
        """Wait for the run to finish; call `on_round` for each new metrics record and
        `on_poll` with Flower's run status at every poll (server/status_file.py)."""
        metrics_path = RunLayout(prepared.run_dir).metrics
        # Lines already shown (a resumed run's file holds earlier rounds, and is rewritten once
        # when the ServerApp drops an interrupted round's line): shown once, by content.
        seen: set[str] = set()
        if prepared.resume and metrics_path.exists():
            seen = set(metrics_path.read_text().splitlines())

        def show_new() -> None:
            if not metrics_path.exists():
                return
            for line in metrics_path.read_text().splitlines():
                if line.strip() and line not in seen and line.endswith("}"):
                    seen.add(line)
                    on_round(json.loads(line))

        started = time.monotonic()
        status = "pending"
        while True:
            if self.superlink is not None and self.superlink.poll() is not None:
                raise CoordinatorError(
                    f"the SuperLink exited with code {self.superlink.returncode}; "
                    f"see {self.opts.log_path}"
                )
            show_new()
            try:
                status = self.run_status(run_id)
            except Exception as e:  # noqa: BLE001 - a transient Control API error: retry
                status = f"unknown ({e})"
            if on_poll is not None:
                on_poll(status)
            if status.startswith("finished"):
                show_new()  # the last round's record
                return status
            if self.opts.run_timeout_s and time.monotonic() - started > self.opts.run_timeout_s:
                self.flwr("stop", str(run_id), CONNECTION)
                raise CoordinatorError(
                    f"run {run_id} did not finish within {self.opts.run_timeout_s:.0f} s "
                    f"(status {status}); stopped it"
                )
            time.sleep(poll_s)

    def catch_up_run_log(self, prepared: PreparedDeployment) -> int:
        """On resume: copy into server.log the lines of the previous start's Flower run that
        it had not copied when it stopped (the SuperLink's database keeps them); returns how
        many."""
        prev = RunLogFile.last_in(prepared.run_dir / "server.log")
        if prev is None:
            return 0
        try:
            res = self.flwr("log", str(prev.flower_run_id), CONNECTION, "--show", timeout=30)
        except subprocess.TimeoutExpired:
            return 0
        return prev.sync(res.stdout, final=True) if res.returncode == 0 else 0

    def save_run_log(self, run_id: int, prepared: PreparedDeployment, *,
                     final: bool = True) -> Path | None:
        """Append what is new in the ServerApp's log (kept by the SuperLink) to
        run_dir/server.log (server/run_log.py): after every round, and at the end (`final`)."""
        res = self.flwr("log", str(run_id), CONNECTION, "--show", timeout=60)
        if res.returncode != 0:
            return None
        if self._run_log is None or self._run_log.flower_run_id != run_id:
            done = prepared.resumed_after
            note = ("resumed: " + (f"rounds 1..{done} completed before" if done
                                   else "no round completed before")) if prepared.resume else ""
            self._run_log = RunLogFile(prepared.run_dir / "server.log", run_id, note)
        self._run_log.sync(res.stdout, final=final)
        return self._run_log.path

    def stop(self) -> None:
        stop_process(self.superlink)
        self.superlink = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None


def _flower_error(e: Exception) -> tuple[int | None, str]:
    """(Flower's error code, a readable message) of an error of the Control API's client."""
    import httpx
    from flwr.supercore.error import FlowerError

    if isinstance(e, httpx.HTTPStatusError):
        err = FlowerError.from_json(e.response.text)
        if err is not None:
            return err.code, " ".join(
                x for x in (f"[code: {err.code}]", err.message, err.public_details) if x)
    return None, str(e)


def _json_tail(stdout: str) -> dict:
    """The JSON object `flwr ... --format json` prints (after any plain-text lines)."""
    start = stdout.find("{")
    if start < 0:
        return {}
    try:
        return json.loads(stdout[start:])
    except json.JSONDecodeError:
        return {}
