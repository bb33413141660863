"""Peak memory of every process of a `fedtune simulate` run, the Ray site workers included
(`time -v` on the command sees only the driver).

Runs the real CLI in a subprocess whose environment carries a marker, samples /proc every
0.3 s for the processes that carry it (the driver, Ray's GCS / raylet / agents, the site
workers: all inherit the environment) and keeps each one's peak resident set (VmHWM, the
kernel's own high-water mark). Prints one line per model and writes results/site_memory.md.

    .venv/bin/python benchmarks/bench_site_memory.py                 # MiniLM and SmolLM2
    .venv/bin/python benchmarks/bench_site_memory.py --models all-minilm-l6-v2 --sites 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "site_memory.md"


@dataclass
class Proc:
    kind: str  # driver, site worker, ray (GCS, raylet, agents)
    name: str
    peak_mb: float


def _status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _marked(marker: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _kind(pid: int, driver: int) -> tuple[str, str]:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        cmd = "?"
    if pid == driver:
        return "driver", "fedtune simulate"
    if cmd.startswith("ray::ClientAppActor"):  # Flower's actor that runs the sites
        return "site worker", "ray::ClientAppActor"
    return "ray", (cmd.split()[0].rsplit("/", 1)[-1] if cmd else "?")


def measure(model: str, sites: int, rounds: int, extra: list[str]) -> tuple[list[Proc], float]:
    """Peak RSS of each process of one run; returns them and the run's wall time."""
    marker = uuid.uuid4().hex
    out_dir = tempfile.mkdtemp(prefix="fedtune-mem-")
    sets = [f"model.name={model}", f"federation.num_sites={sites}",
            f"federation.rounds={rounds}", f"output.dir={out_dir}", "output.run_name=mem",
            *extra]
    cmd = [sys.executable, "-m", "fedtune", "simulate"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "FEDTUNE_MEM_MARK": marker}
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    peaks: dict[int, tuple[str, str, int]] = {}
    while proc.poll() is None:
        for pid in _marked(marker.encode()):
            hwm = _status_kb(pid, "VmHWM")
            if hwm is None:
                continue
            kind, name = _kind(pid, proc.pid)
            peaks[pid] = (kind, name, max(hwm, peaks.get(pid, ("", "", 0))[2]))
        time.sleep(0.3)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"fedtune simulate failed ({proc.returncode}):\n{err[-3000:]}")
    procs = [Proc(k, n, kb / 1024) for k, n, kb in peaks.values()]
    return sorted(procs, key=lambda p: -p.peak_mb), time.time() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["all-minilm-l6-v2", "smollm2-135m-instruct"])
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", dest="extra", action="append", default=[
        "train.local_steps=3", "train.batch_size=8", "data.demo_records=200"])
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--verbose", action="store_true", help="every process's peak")
    a = ap.parse_args()
    command = " ".join(["python benchmarks/bench_site_memory.py", *sys.argv[1:]])
    rows = []
    for model in a.models:
        procs, wall = measure(model, a.sites, a.rounds, a.extra)
        workers = [p.peak_mb for p in procs if p.kind == "site worker"]
        driver = sum(p.peak_mb for p in procs if p.kind == "driver")
        ray = sum(p.peak_mb for p in procs if p.kind == "ray")
        total = sum(p.peak_mb for p in procs)
        print(f"{model}: site worker peak {max(workers, default=0):.0f} MB "
              f"(each: {', '.join(f'{w:.0f}' for w in workers)}), driver {driver:.0f} MB, "
              f"Ray's own processes {ray:.0f} MB, sum of peaks {total:.0f} MB, {wall:.0f} s")
        rows.append((model, workers, driver, ray, total, wall))
        if a.verbose:
            for p in procs:
                print(f"  {p.peak_mb:8.0f} MB  {p.kind:12s} {p.name}")
    if a.no_write:
        return
    lines = [
        "# Peak memory of a simulated site process",
        "",
        f"`{command}` ({a.sites} sites, {a.rounds} rounds, {' '.join(a.extra)}; CPU). Peak "
        "resident set (VmHWM) of each process of the run, sampled from /proc every 0.3 s: the "
        "Ray worker that runs the sites, the `fedtune simulate` driver (which also runs the "
        "ServerApp: held-out evaluation, checkpoints) and Ray's own processes (GCS, raylet, "
        "agents). The sum of peaks is an upper bound of the run's total.",
        "",
        "| model | site worker peak (MB, each) | driver (MB) | Ray's processes (MB) | sum of "
        "peaks (MB) | wall (s) |",
        "|---|---|---|---|---|---|",
    ]
    for model, workers, driver, ray, total, wall in rows:
        lines.append(f"| {model} | {', '.join(f'{w:.0f}' for w in workers)} | {driver:.0f} | "
                     f"{ray:.0f} | {total:.0f} | {wall:.0f} |")
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
