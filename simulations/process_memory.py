"""Peak memory of every process of a simulation: the driver, Ray's own processes and the Ray
workers that run the sites (`time -v fedtune simulate` sees only the driver).

The driver puts a marker in its environment before Ray starts; every process Ray starts on this
machine inherits it. A background thread samples /proc every `interval` seconds for the marked
processes and keeps each one's peak resident set (VmHWM, the kernel's own high-water mark), so
a worker that exits before the end is still counted. Linux only; elsewhere nothing is measured.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

MARKER_VAR = "FEDTUNE_PROCESS_MARK"


@dataclass(frozen=True)
class ProcessPeak:
    kind: str  # "driver", "site worker" or "ray" (GCS, raylet, agents, idle workers)
    name: str
    peak_mb: float


def _status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def marked_pids(marker: bytes) -> list[int]:
    """Processes whose environment carries `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def classify(pid: int, driver: int) -> tuple[str, str]:
    """(kind, name) of a marked process."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        cmd = "?"
    if pid == driver:
        return "driver", "fedtune simulate"
    if cmd.startswith("ray::ClientAppActor"):  # Flower's actor that runs the sites
        return "site worker", "ray::ClientAppActor"
    return "ray", (cmd.split()[0].rsplit("/", 1)[-1] if cmd else "?")


class PeakSampler:
    """Samples the marked processes' VmHWM until stopped; `peaks()` gives one row per process.

    `marker` None: the one already in the environment, else a new one set there (so that the
    processes this one starts from now on carry it); `driver` is the pid reported as "driver"."""

    def __init__(self, marker: str | None = None, driver: int | None = None,
                 interval: float = 0.5) -> None:
        inherited = os.environ.get(MARKER_VAR)  # a benchmark measuring this run from outside
        self._own_marker = marker is None and not inherited
        self.marker = marker or inherited or uuid.uuid4().hex
        self.driver = os.getpid() if driver is None else driver
        self.interval = interval
        self._peaks: dict[int, tuple[str, str, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakSampler:
        if self._own_marker:
            os.environ[MARKER_VAR] = self.marker
        if Path("/proc/self/status").exists():
            self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sample()  # the processes still alive, once more
        if self._own_marker:
            os.environ.pop(MARKER_VAR, None)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        # The driver by its pid: a marker set in os.environ reaches the processes it starts,
        # not its own /proc/<pid>/environ.
        for pid in {*marked_pids(self.marker.encode()), self.driver}:
            hwm = _status_kb(pid, "VmHWM")
            if hwm is None:
                continue
            kind, name = classify(pid, self.driver)
            old = self._peaks.get(pid, ("", "", 0))[2]
            self._peaks[pid] = (kind, name, max(hwm, old))

    def peaks(self) -> list[ProcessPeak]:
        """Every process seen, largest first."""
        rows = [ProcessPeak(k, n, kb / 1024) for k, n, kb in self._peaks.values()]
        return sorted(rows, key=lambda p: -p.peak_mb)


def summary_line(peaks: list[ProcessPeak]) -> str | None:
    """One line for the run's summary: site workers, driver, Ray, and the sum of peaks (an upper
    bound of the run's total, as the peaks need not coincide)."""
    if not peaks:
        return None
    workers = [p.peak_mb for p in peaks if p.kind == "site worker"]
    driver = sum(p.peak_mb for p in peaks if p.kind == "driver")
    ray = sum(p.peak_mb for p in peaks if p.kind == "ray")
    total = sum(p.peak_mb for p in peaks)
    sites = (f"site workers {max(workers):,.0f} MB (largest of {len(workers)})" if workers
             else "site workers not seen (a Ray cluster elsewhere)")
    return (f"peak memory (resident): {sites}, driver {driver:,.0f} MB, Ray's own processes "
            f"{ray:,.0f} MB; all processes at most {total / 1024:.1f} GB")
