"""`fedtune client`: the site daemon.

Runs a Flower SuperNode for this site and keeps it running:

- validates site.toml before anything starts (each error names its key);
- starts `flower-supernode` with the site's key (SuperNode authentication), the CA certificate
  (TLS), and the site's config file as node config, so the ClientApp (client/supernode_app.py)
  finds the site's private data, state directory and privacy budget;
- when the link to the coordinator is lost (the coordinator restarts, the network drops) the
  SuperNode gives up after `daemon.link_timeout_s`, and the daemon starts a new one after an
  exponential backoff (doubling from `daemon.initial_backoff_s` to `daemon.max_backoff_s`);
- logs one JSON object per line on stdout (`ts`, `level`, `site`, `event`, ...); when the link
  fails, probes it once and says in words if TLS is the cause (`tls_mismatch`: a plaintext
  daemon on a TLS coordinator, a foreign CA, a certificate without the dialled name);
- on SIGTERM/SIGINT stops the SuperNode (and a ClientApp in progress) and exits 0. The privacy
  ledger commits every spend with fsync before training, and local copies are written to a
  temporary file then renamed, so stopping at any moment leaves no half-written state.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from fedtune.client.site_config import SiteConfig

ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXIT_REFUSED = 3  # the coordinator refused this site's key and --max-restarts ran out
EXIT_INVALID_INPUT = 2  # the start-up checks failed (client/preflight.py): nothing was started


class JsonLog:
    """One JSON object per line, flushed at once (journald, docker logs, kubectl logs)."""

    def __init__(self, site_id: str, stream: IO[str] | None = None) -> None:
        self.site_id = site_id
        self.stream = stream or sys.stdout
        self.lock = threading.RLock()  # re-entrant: the SIGTERM handler logs too

    def __call__(self, event: str, level: str = "info", **fields: Any) -> None:
        rec = {"ts": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
               "level": level, "site": self.site_id, "event": event, **fields}
        line = json.dumps(rec, default=str)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()


def _classify(line: str) -> tuple[str, str] | None:
    """(event, level) for the SuperNode output lines that matter to an operator."""
    if "SuperNode ID:" in line:
        return "connected", "info"
    if "Failed to activate SuperNode" in line or "code: 2004" in line:
        return "refused", "error"
    if "Connection attempt failed" in line:
        return "connection_retry", "warning"
    if "Connection successful after" in line:  # a retried call went through: the link is back
        return "connection_ok", "info"
    if "Giving up reconnection" in line or "Exit Code: 305" in line:
        return "disconnected", "warning"
    if re.search(r"\[RUN \d+, ROUND \d+\]", line):
        return "round_message", "info"
    if "ERROR" in line or "Traceback" in line:
        return "flower", "error"
    if "WARNING" in line:
        return "flower", "warning"
    return None


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def diagnose_link(address: str, root_certificate: Path | None, insecure: bool,
                  timeout: float = 3.0) -> str | None:
    """Why the SuperNode cannot reach the coordinator, when the cause is TLS; None otherwise.

    The SuperNode only logs "Connection attempt failed, retrying..." whatever the cause. This
    probe opens one TCP connection and tries a TLS handshake as the SuperNode would (gRPC: ALPN
    h2, the CA of site.toml, the coordinator's name checked), so the daemon can say which of a
    plaintext client on a TLS coordinator, a TLS client on a plaintext coordinator, a foreign CA
    or a certificate without the dialled name it is. An unreachable port is not diagnosed here
    (the coordinator may simply not be up yet)."""
    try:
        host, port = _host_port(address)
    except ValueError:
        return None
    where = f"the coordinator at {host}:{port}"
    if insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    else:
        if root_certificate is None or not Path(root_certificate).is_file():
            return None
        ctx = ssl.create_default_context(cafile=str(root_certificate))
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname=host):
                    pass
            except ssl.SSLCertVerificationError as e:
                if e.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
                    return (f"{where} presents a TLS certificate that does not name {host!r} "
                            f"({e.verify_message}): connect with a name the coordinator's "
                            "certificate was issued for (coordinator.address in site.toml), or "
                            "ask its operator to add this one (`fedtune certs server --host "
                            f"{host} --force`, then restart `fedtune server`)")
                return (f"{where} requires TLS and its certificate is not signed by your CA "
                        f"({e.verify_message}): set coordinator.root_certificate in site.toml "
                        f"(now {root_certificate}) to the consortium's ca.crt, the one that "
                        "signed the coordinator's certificate (`fedtune certs init`)")
            except (TimeoutError, ssl.SSLError, ConnectionError) as e:
                if insecure:
                    return None  # not a TLS server either: something else is wrong
                return (f"{where} does not speak TLS ({e.__class__.__name__}: {e}): it runs "
                        "with --insecure (plaintext, test networks only), or another service "
                        "listens on that port; check coordinator.address in site.toml")
    except OSError:
        return None  # nothing listens (yet): the SuperNode's retries cover it
    if insecure:
        return (f"{where} requires TLS, and this daemon runs with --insecure (plaintext), "
                "which a TLS coordinator refuses: remove --insecure and set "
                "coordinator.root_certificate (the consortium's ca.crt) and auth.private_key "
                "(this site's key) in site.toml")
    return None


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


class SiteDaemon:
    def __init__(self, cfg: SiteConfig, config_path: Path, *, insecure: bool = False,
                 max_restarts: int | None = None, log: JsonLog | None = None) -> None:
        self.cfg = cfg
        self.config_path = Path(config_path).resolve()
        self.insecure = insecure
        self.max_restarts = max_restarts
        self.log = log or JsonLog(cfg.site_id)
        self.proc: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.refused = threading.Event()
        self.lost = threading.Event()
        # When the SuperNode started retrying the link (None: connected, or not retrying).
        self.retrying_since: float | None = None
        # What the link probe found (diagnose_link), once per SuperNode; "" if nothing TLS
        self.link_problem: str | None = None
        self.restarts = 0  # SuperNodes started after the first one

    @property
    def flwr_home(self) -> Path:
        return self.cfg.state_dir / "flwr-home"

    def command(self) -> list[str]:
        c = self.cfg
        exe = Path(sys.executable).parent / "flower-supernode"
        cmd = [str(exe) if exe.exists() else "flower-supernode",
               "--superlink", c.coordinator.address,
               "--grpc-rere",
               "--isolation", "subprocess",
               "--host", "127.0.0.1", "--port", str(c.daemon.runtime_port),
               "--max-wait-time", str(c.daemon.link_timeout_s),
               "--node-config", f'site-config="{self.config_path}"']
        if self.insecure:
            cmd.append("--insecure")
        else:
            assert c.coordinator.root_certificate is not None and c.auth is not None
            cmd += ["--root-certificates", str(c.coordinator.root_certificate),
                    "--auth-supernode-private-key", str(c.auth.private_key)]
        return cmd

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FLWR_HOME"] = str(self.flwr_home)
        env["FEDTUNE_SITE_CONFIG"] = str(self.config_path)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = ANSI.sub("", raw.decode("utf-8", "replace")).rstrip()
            if not line:
                continue
            kind = _classify(line)
            if kind is None:
                self.log("flower", "debug", msg=line)
                continue
            event, level = kind
            if event == "connected":
                self.connected.set()
                self.retrying_since = None
            elif event == "connection_retry" and self.retrying_since is None:
                self.retrying_since = time.monotonic()
                self._diagnose()
            elif event == "connection_ok":
                # Without this, one transient retry (of the SuperNode, its SuperExec or a
                # ClientApp) left the clock running, and a healthy SuperNode was restarted as
                # "stalled" 2 x link_timeout_s later, in the middle of a round (a dropout).
                self.retrying_since = None
            elif event == "disconnected":
                self.lost.set()  # the SuperNode gave up on the link; _wait_child restarts it
                self._diagnose()
                if self.link_problem:
                    self.log(event, level, msg=line, cause=self.link_problem)
                    continue
            elif event == "refused":
                self.refused.set()
                self.log("refused", "error", msg=line, hint=self.refusal_hint())
                continue
            self.log(event, level, msg=line)

    def _diagnose(self) -> None:
        """Probe the link once per SuperNode when it fails; log a TLS mismatch in words (the
        SuperNode only says "Connection attempt failed, retrying...")."""
        if self.link_problem is not None:
            return
        c = self.cfg
        self.link_problem = diagnose_link(c.coordinator.address, c.coordinator.root_certificate,
                                          self.insecure) or ""
        if self.link_problem:
            self.log("tls_mismatch", "error", msg=self.link_problem,
                     coordinator=c.coordinator.address)

    def refusal_hint(self) -> str:
        """What a refused activation means, in words. The coordinator answers the same
        "Failed to activate SuperNode" whether the key is unknown or not registered yet, so
        the site cannot tell which: say both, and whether the daemon retries."""
        c = self.cfg
        retries = self.max_restarts is None or self.restarts < self.max_restarts
        then = (f"the daemon retries (backoff {c.daemon.initial_backoff_s:g} s doubling up "
                f"to {c.daemon.max_backoff_s:g} s), so a key registered later is picked up "
                "without a restart" if retries
                else "the daemon does not retry (--max-restarts reached) and exits")
        return ("the coordinator refused this site: the public key of this site "
                f"({c.auth.private_key if c.auth else 'auth.private_key'}) is not registered "
                f"at the coordinator {c.coordinator.address}. Either not yet (the coordinator "
                "is still starting, or its operator has not registered the key yet), or not "
                "at all (the coordinator does not know this key: send this site's site.pub to "
                "its operator, who runs `fedtune certs register "
                f"{c.site_id} --public-key site.pub` and restarts `fedtune server`). Right "
                "after a coordinator restart it can also still list this site as online "
                f"(clears within about a minute). {then[0].upper()}{then[1:]}.")

    def _handle_signal(self, signum, _frame) -> None:
        self.log("stopping", signal=signal.Signals(signum).name)
        self.stopping.set()  # the main loop stops the SuperNode

    def _wait_child(self) -> int:
        """Wait for the SuperNode; once a stop is requested, give it stop_timeout_s."""
        proc = self.proc
        assert proc is not None
        stop_since: float | None = None
        killed = False
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            # Seen after a coordinator restart: the SuperNode's retries stop well before
            # --max-wait-time and it never gives up. Treat a link retried for twice that long
            # as lost, so the daemon starts a fresh SuperNode.
            since = self.retrying_since
            if (since is not None and not self.lost.is_set()
                    and time.monotonic() - since > 2 * self.cfg.daemon.link_timeout_s):
                self.log("link_stalled", "warning",
                         msg="the SuperNode has been retrying the coordinator link for "
                             f"{time.monotonic() - since:.0f} s; restarting it")
                self.lost.set()
            # A SuperNode that gave up on the link does not always exit by itself: stop it,
            # the main loop starts a new one after the backoff.
            if self.stopping.is_set() or self.lost.is_set():
                if stop_since is None:
                    stop_since = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
                if not killed and time.monotonic() - stop_since > self.cfg.daemon.stop_timeout_s:
                    self.log("stop_timeout", "warning", msg="SuperNode did not stop; killing it")
                    self._killpg(signal.SIGKILL)
                    killed = True
        # SuperExec / a ClientApp of this SuperNode still alive (its own session): stop them.
        self._killpg(signal.SIGTERM)
        return rc

    def _killpg(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def run(self) -> int:
        c = self.cfg
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle_signal)
        if self.insecure:
            self.log("insecure", "warning",
                     msg="PLAINTEXT connection to the coordinator (--insecure): updates travel "
                         "unencrypted and this site is not authenticated. Never use this "
                         "outside a test network.")
        self.log("started", coordinator=c.coordinator.address, data=str(c.data),
                 state_dir=str(c.state_dir), tls=not self.insecure,
                 privacy=c.privacy.model_dump(exclude_none=True), pid=os.getpid())
        # Data, state directory, ledger: checked before the SuperNode (and any training) starts.
        from fedtune.client.preflight import preflight

        problems = preflight(c)
        if problems:
            self.log("invalid_input", "error", problems=problems,
                     msg="start-up checks failed; nothing was started: " + "; ".join(problems))
            return EXIT_INVALID_INPUT
        failures = 0
        self.restarts = 0
        while not self.stopping.is_set():
            self.connected.clear()
            self.refused.clear()
            self.lost.clear()
            self.retrying_since = None
            self.link_problem = None
            started = time.monotonic()
            self.proc = subprocess.Popen(
                self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=self.env(), cwd=c.state_dir, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            self.log("supernode_started", pid=self.proc.pid)
            pump = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
            pump.start()
            rc = self._wait_child()
            pump.join(timeout=5)
            if self.stopping.is_set():
                break
            if self.connected.is_set() and time.monotonic() - started > 10:
                failures = 0  # it was up: the next outage starts the backoff afresh
            failures += 1
            self.restarts += 1
            if self.max_restarts is not None and self.restarts > self.max_restarts:
                self.log("giving_up", "error", exit_code=rc, restarts=self.restarts - 1,
                         **({"cause": self.link_problem} if self.link_problem else {}))
                return EXIT_REFUSED if self.refused.is_set() else 1
            delay = min(c.daemon.max_backoff_s, c.daemon.initial_backoff_s * 2 ** (failures - 1))
            self.log("reconnecting", "warning", exit_code=rc, in_s=round(delay, 2),
                     attempt=failures, refused=self.refused.is_set())
            self.stopping.wait(delay)
        self.log("stopped", exit_code=self.proc.returncode if self.proc else None)
        return 0
