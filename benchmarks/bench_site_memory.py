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
from pathlib import Path

from fedtune.simulations.process_memory import MARKER_VAR, PeakSampler, ProcessPeak

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "site_memory.md"


def measure(model: str, sites: int, rounds: int, extra: list[str]
            ) -> tuple[list[ProcessPeak], float]:
    """Peak RSS of each process of one run; returns them and the run's wall time."""
    marker = uuid.uuid4().hex
    out_dir = tempfile.mkdtemp(prefix="fedtune-mem-")
    sets = [f"model.name={model}", f"federation.num_sites={sites}",
            f"federation.rounds={rounds}", f"output.dir={out_dir}", "output.run_name=mem",
            *extra]
    cmd = [sys.executable, "-m", "fedtune", "simulate"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, MARKER_VAR: marker}
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    with PeakSampler(marker, driver=proc.pid, interval=0.3) as sampler:
        err = proc.stderr.read() if proc.stderr else ""
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"fedtune simulate failed ({proc.returncode}):\n{err[-3000:]}")
    return sampler.peaks(), time.time() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["all-minilm-l6-v2", "smollm2-135m-instruct"])
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", dest="extra", action="append", default=[
        "train.local_steps=3", "train.batch_size=8", "data.demo_records=200"])
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--out", type=Path, default=OUT, help="the markdown table to write")
    ap.add_argument("--append", action="store_true", help="add a section to --out")
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
    if a.append and a.out.is_file():
        lines = [a.out.read_text().rstrip("\n"), "", "#" + lines[0], *lines[1:]]
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
