"""The run's coordinator log, `<run_dir>/server.log`: one plain-text file per run, appended to by
every start of `fedtune server` (a `--resume` adds to it, never truncates it).

The ServerApp runs in a process of the SuperLink, which keeps its output; the coordinator copies
what is new into server.log after every round and when the run ends, so a coordinator killed
mid-run leaves the log up to its last round. Each start writes a header line naming the Flower
run it follows. ANSI colour codes are removed; the ServerApp logs each line once, without colour
(`plain_flower_logging`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
HEADER = "==== fedtune server"
# Printed by the `flwr` command itself, not by the ServerApp
_CLI_NOISE = ("Using SuperLink:",)


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def plain_flower_logging() -> None:
    """In the ServerApp's process: Flower's log lines once each, without colour, timestamped.

    Opacus calls `logging.basicConfig` when imported, which gives the root logger a handler;
    Flower's logger propagates to the root, so every line was written twice (once coloured by
    Flower's handler, once by the root's), and the SuperLink keeps both. Flower's handler alone
    remains, at DEBUG, so the SecAgg+ stage lines (which site count answered each stage) stay."""
    from flwr.common.logger import update_console_handler

    logging.getLogger("flwr").propagate = False
    update_console_handler(level=logging.DEBUG, timestamps=True, colored=False)


class RunLogFile:
    """Appends the log of one Flower run (its text so far, as `flwr log --show` prints it) to
    server.log, line by line: only what is new since the last call."""

    def __init__(self, path: Path, flower_run_id: int, note: str = "") -> None:
        self.path = Path(path)
        self.flower_run_id = flower_run_id
        self.note = note
        self._lines = 0  # lines of this Flower run's log already in the file
        self._started = False

    @classmethod
    def last_in(cls, path: Path) -> RunLogFile | None:
        """The Flower run the file's last header names, positioned after the lines already
        copied from it (None: no header): a resumed run first copies what the previous start,
        killed, had not copied yet."""
        path = Path(path)
        if not path.is_file():
            return None
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        starts = [i for i, ln in enumerate(lines) if ln.startswith(HEADER)]
        if not starts:
            return None
        found = re.search(r": Flower run (\d+)", lines[starts[-1]])
        if found is None:
            return None
        log = cls(path, int(found.group(1)))
        log._lines, log._started = len(lines) - starts[-1] - 1, True
        return log

    def sync(self, text: str, *, final: bool = False) -> int:
        """Append the complete lines not yet written (all of them when `final`); returns how
        many were appended."""
        text = strip_ansi(text.removesuffix("\n"))  # `flwr log` adds one newline of its own
        parts = text.split("\n")
        tail = parts.pop()  # "" after a final newline, else a line that may still be incomplete
        if final and tail:
            parts.append(tail)
        lines = [ln.rstrip() for ln in parts if not ln.startswith(_CLI_NOISE)]
        new = lines[self._lines:]
        out = []
        if not self._started:
            when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            out.append(f"{HEADER} {when}: Flower run {self.flower_run_id}"
                       + (f" ({self.note})" if self.note else "") + " ====")
            self._started = True
        out += new
        if out:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write("\n".join(out) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        self._lines = len(lines)
        return len(new)


# gRPC's own line when a TLS handshake on the Fleet API fails; a plaintext ClientHello (a site
# started with --insecure) fails it with WRONG_VERSION_NUMBER (or HTTP_REQUEST).
_HANDSHAKE = re.compile(r"Handshake failed with error (\S+): (.*)")
_PLAINTEXT = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST")


class HandshakeWatch:
    """Reads the SuperLink's log (`<state-dir>/logs/superlink.log`) for failed TLS handshakes
    and says, in words, that a plaintext client was refused.

    The refusal happens inside gRPC's TLS layer, before Flower sees a connection: the only trace
    is gRPC's own log line "Handshake failed with error SSL_ERROR_SSL: ...WRONG_VERSION_NUMBER"
    (it names no peer address), which gRPC writes only when GRPC_VERBOSITY is not `error`, the
    level Flower sets in every process that imports it; the coordinator therefore starts the
    SuperLink with it empty (gRPC's default). A site with a wrong CA leaves no trace at the
    coordinator: with TLS 1.3 the site rejects the certificate after the coordinator finished
    its part of the handshake, and gRPC logs nothing. Said at once, then at most once a minute
    with the count (a refused SuperNode retries every few seconds)."""

    def __init__(self, log_path: Path, say: Callable[[str], None], fleet_address: str,
                 every_s: float = 60.0) -> None:
        self.path = Path(log_path)
        self.say = say
        self.fleet = fleet_address
        self.every_s = every_s
        self._offset = self.path.stat().st_size if self.path.exists() else 0
        self._pending = 0
        self._last_said: float | None = None

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        text = chunk[:end].decode("utf-8", "replace")
        self._pending += sum(1 for m in _HANDSHAKE.finditer(text)
                             if any(p in m.group(2) for p in _PLAINTEXT))
        now = time.monotonic()
        if self._pending and (self._last_said is None or now - self._last_said >= self.every_s):
            self.say(f"Fleet API {self.fleet}: refused {self._pending} plaintext connection "
                     "attempt(s) (no TLS: a site daemon started with --insecure, or a client "
                     "that is not a fedtune site). gRPC does not log the client's address; the "
                     "site's own log says `tls_mismatch`. Such a site must drop --insecure and "
                     "use the consortium's ca.crt as coordinator.root_certificate.")
            self._pending, self._last_said = 0, now
