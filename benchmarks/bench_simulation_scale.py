"""Simulation scale: `fedtune simulate` with 10 / 100 / 1,000 sites, the same number trained
per round (`federation.fraction_fit` = per_round / sites), MiniLM on Banking77.

For each size: wall time of the whole command, peak RSS of the whole process tree (the CLI, Ray's
daemons and workers; sampled every 0.2 s; shared pages are counted in every process that maps
them, so this is an upper bound), and the framework overhead

    (wall - time inside local training / parallel workers - time inside aggregation) / wall

over the rounds (round 1 sampling to the last evaluation; `round_seconds`) and over the whole
command (Ray start-up, model loading, data preparation included). Local training time is what
each site measures around `train_local` (`train_seconds`), aggregation what the server measures
around its aggregation (`aggregation.seconds`), both in metrics.jsonl. The server's held-out
evaluation counts as overhead here (conservative). The overhead is then split by what the run
records: the sites' fit calls outside training (data, ledger fsyncs, encoding: `fit_seconds` -
`train_seconds`, per worker), the server's evaluation (`evaluate_seconds`) and checkpoints
(`checkpoint_seconds`), and the rest: Flower's message passing and Ray's dispatch.

    python benchmarks/bench_simulation_scale.py --sites 10 100 1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("FEDTUNE_DATASETS", REPO.parent / "shared" / "datasets"))


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def _train_and_aggregation_seconds(rounds: list[dict]) -> tuple[float, float]:
    """Time inside the sites' local training (summed over sites) and the server's aggregation."""
    return (sum(s.get("train_seconds", 0.0) for r in rounds for s in r["sites"]),
            sum(r.get("aggregation", {}).get("seconds", 0.0) for r in rounds))


def run(sites: int, a: argparse.Namespace) -> dict:
    name = f"scale-{sites}-{int(time.time())}"
    sets = [
        "model.name=all-minilm-l6-v2", f"data.train={DATASETS / 'banking77' / 'train.csv'}",
        f"data.eval={DATASETS / 'banking77' / 'test.csv'}", "data.text_column=text",
        "data.label_column=category", f"data.max_eval_records={a.eval_records}",
        f"data.max_records_per_site={a.records}", f"federation.num_sites={sites}",
        f"federation.fraction_fit={a.per_round / sites}", f"federation.rounds={a.rounds}",
        f"train.local_steps={a.steps}", f"train.batch_size={a.batch}",
        f"federation.parallel_sites={a.parallel}", f"train.threads={a.threads}",
        f"output.dir={a.out}", f"output.run_name={name}", "model.max_length=64",
        f"federation.evaluate_every={a.evaluate_every}",
    ]
    cmd = [sys.executable, "-m", "fedtune", "simulate"]
    for s in sets:
        cmd += ["--set", s]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, text=True)
    ps = psutil.Process(proc.pid)
    peak, cpu = 0, 0.0
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(ps))
            times = ps.cpu_times()  # the CLI itself: server app, Flower's engine threads
            cpu = times.user + times.system
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    out = proc.stdout.read() if proc.stdout else ""
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"simulate with {sites} sites failed:\n{out[-4000:]}")
    records = [json.loads(x) for x in (Path(a.out) / name / "metrics.jsonl").read_text()
               .splitlines()]
    rounds = [r for r in records if r["round"] > 0]
    train, agg = _train_and_aggregation_seconds(rounds)
    trained = sum(1 for r in rounds for s in r["sites"] if s.get("status") == "ok")
    rounds_wall = sum(r["round_seconds"] for r in rounds)
    useful = train / a.parallel + agg
    fit_rest = sum(s.get("fit_seconds", 0.0) - s.get("train_seconds", 0.0)
                   for r in rounds for s in r["sites"] if "fit_seconds" in s) / a.parallel
    evaluate = sum(r.get("evaluate_seconds", 0.0) for r in rounds)
    checkpoint = sum(r.get("checkpoint_seconds", 0.0) for r in rounds)
    split = {"site fit outside training": fit_rest, "server evaluation": evaluate,
             "server checkpoints": checkpoint,
             "Flower/Ray messaging (rest)": rounds_wall - useful - fit_rest - evaluate - checkpoint}
    # Round 1 also pays each worker's start (imports, model load) on its first message; the
    # later rounds are what every further round of a long run costs.
    later = rounds[1:]
    later_wall = sum(r["round_seconds"] for r in later)
    later_train, later_agg = _train_and_aggregation_seconds(later)
    later_useful = later_train / a.parallel + later_agg
    return {"sites": sites, "wall_s": wall, "rounds_wall_s": rounds_wall,
            "overhead_split_s": split,
            "overhead_after_round_1": (later_wall - later_useful) / later_wall if later else None,
            "round_1_s": rounds[0]["round_seconds"],
            "later_round_s": later_wall / len(later) if later else None,
            "peak_rss_mib": peak / 2**20, "coordinator_cpu_s": cpu, "train_s": train,
            "aggregate_s": agg,
            "sites_trained": trained, "overhead_rounds": (rounds_wall - useful) / rounds_wall,
            "overhead_total": (wall - useful) / wall, "load": [load0, os.getloadavg()[0]],
            "accuracy": records[-1]["eval"].get("accuracy")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--per-round", type=int, default=10, help="sites trained per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--records", type=int, default=10, help="max records per site")
    p.add_argument("--eval-records", type=int, default=200)
    p.add_argument("--evaluate-every", type=int, default=1, help="server evaluation every k rounds")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="/tmp/fedtune-bench/scale")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = []
    for n in a.sites:
        rows.append(run(n, a))
        r = rows[-1]
        print(f"{n:5d} sites: wall {r['wall_s']:6.1f} s (rounds {r['rounds_wall_s']:6.1f} s), "
              f"peak RSS (tree) {r['peak_rss_mib']:7.0f} MiB, trained {r['sites_trained']} "
              f"site-rounds, training {r['train_s']:.1f} s / {a.parallel} workers, aggregation "
              f"{r['aggregate_s']:.2f} s; overhead rounds {r['overhead_rounds']:.1%}, whole "
              f"command {r['overhead_total']:.1%}; coordinator process CPU "
              f"{r['coordinator_cpu_s']:.1f} s; load {r['load'][0]:.2f}->{r['load'][1]:.2f}",
              flush=True)
        if r["overhead_after_round_1"] is not None:
            print(f"       round 1 {r['round_1_s']:.1f} s (workers start), later rounds "
                  f"{r['later_round_s']:.1f} s each: overhead after round 1 "
                  f"{r['overhead_after_round_1']:.1%}", flush=True)
        print("       overhead of the rounds: " + ", ".join(
            f"{k} {v:.1f} s ({v / r['rounds_wall_s']:.0%})"
            for k, v in r["overhead_split_s"].items()), flush=True)
    if len(rows) > 1:
        base = rows[0]
        for r in rows[1:]:
            print(f"peak RSS {r['sites']} vs {base['sites']} sites: "
                  f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
