"""Stopping a simulation on Ctrl-C or SIGTERM within a second or two, leaving no process behind.

Flower's simulation engine runs the ServerApp in a non-daemon thread and the sites in Ray
worker processes; a KeyboardInterrupt in the main thread waits on Flower's worker threads, which
only stop when the run ends, and Ray's own SIGTERM handler (installed by `ray.init`) only raises
SystemExit into that same wait. So the handler here does the stopping itself: it ends every
process this one started (Ray's GCS, raylet, its agents and the site workers, grandchildren
included) and exits at once. Every finished round is already on disk (metrics.jsonl and the
checkpoints are fsynced when the round ends), so nothing of a finished round is lost.

It ends only this process's own descendants. Attached to a running Ray cluster
(`fedtune simulate --ray-address`), the cluster's GCS, raylets and workers are not among them and
keep running; Ray releases the run's site actors once this driver has gone.

Ray also starts its workers at a lower priority (`RAY_worker_niceness`, nice 15 in Ray 2.x):
on a busy machine the sites then get a fraction of the CPU that the user's command gets.
`same_priority_workers` asks Ray for the caller's own priority unless the user set it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

NICENESS_ENV = "RAY_worker_niceness"


def same_priority_workers() -> None:
    """Ray workers at this process's niceness, not Ray's lower default (an explicit
    RAY_worker_niceness in the environment wins)."""
    os.environ.setdefault(NICENESS_ENV, str(os.nice(0)))


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), from /proc (or psutil)."""
    parents: dict[int, list[int]] = {}
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after "(comm)"
            parents.setdefault(ppid, []).append(int(entry.name))
    else:  # pragma: no cover - macOS
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_tree(pid: int, grace_s: float = 2.0) -> None:
    """SIGTERM every descendant of `pid`, then SIGKILL those still alive after `grace_s`."""
    procs = descendants(pid)
    for p in procs:
        try:
            os.kill(p, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.05)
    for p in procs + descendants(pid):  # and any started meanwhile
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@contextmanager
def stop_on_signal(on_stop: Callable[[str], None] | None = None) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM end this process's children and exit at once
    (status 128 + signal). `on_stop(signal name)` runs first (restore the terminal, say what
    was kept). Call it after Ray is initialised: `ray.init` replaces the SIGTERM handler."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        name = signal.Signals(signum).name
        try:
            if on_stop is not None:
                on_stop(name)
        finally:
            try:  # whatever goes wrong while stopping, the process still exits with 128 + signal
                # No grace period: Ray's core worker in this process exits with status 1 as soon
                # as it sees its raylet die, which would race the exit status below.
                kill_tree(os.getpid(), grace_s=0.0)
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
