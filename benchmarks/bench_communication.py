"""Communication: bytes a site uploads per round, and the accuracy cost of fp16 / int8 deltas.

Part 1 (no training): the serialised size of one site's reply, exactly as Flower sends it and the
ledger records it (common/payload.py), for each `federation.update_encoding` and for FedAvg vs
FFA-LoRA (B only), against the raw float32 size of the tensors FedAvg-LoRA trains.

Part 2 (training): `fedtune simulate` on Banking77 with MiniLM, once per encoding, same seeds
(same Poisson batches, same noise draws at the sites): final held-out accuracy and the bytes the
server received per site per round (`aggregation.upload_bytes` in metrics.jsonl).

    python benchmarks/bench_communication.py --rounds 6 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fedtune.common.codec import ENCODINGS, encode, fp32_bytes
from fedtune.common.config import load_config
from fedtune.common.ledger import PrivacyLedger
from fedtune.common.lora import get_adapter
from fedtune.common.model_cache import get_runtime
from fedtune.common.payload import payload_digest
from fedtune.common.tasks import num_labels, resolve_task

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("FEDTUNE_DATASETS", REPO.parent / "shared" / "datasets"))


def sizes_table(models: list[str]) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for name in models:
        base = [f"model.name={name}", "model.device=cpu", "model.dtype=float32"]
        if name == "all-minilm-l6-v2":
            labels = json.loads((DATASETS / "banking77" / "categories.json").read_text())
            base.append(f"data.labels={json.dumps(labels)}")
        fedavg_raw = None
        for strategy in ("fedavg", "ffa_lora"):
            cfg = load_config(overrides=[*base, f"federation.strategy={strategy}"])
            task = resolve_task(cfg)
            rt = get_runtime(cfg, task, num_labels(cfg, task))
            shapes = [a.shape for a in get_adapter(rt.model)]
            delta = [rng.normal(0, 1e-3, s).astype(np.float32) for s in shapes]
            raw = fp32_bytes(delta)
            fedavg_raw = fedavg_raw or raw
            for enc in ENCODINGS:
                sent = payload_digest(encode(delta, enc)).bytes
                rows.append({"model": name, "strategy": strategy, "encoding": enc,
                             "tensors": len(shapes), "params": raw // 4, "bytes": sent,
                             "vs_fp32_raw": sent / fedavg_raw})
    return rows


def simulate(enc: str, a: argparse.Namespace, out: Path) -> dict:
    name = f"comm-{enc}-{int(time.time())}"
    sets = [
        "model.name=all-minilm-l6-v2", f"data.train={DATASETS / 'banking77' / 'train.csv'}",
        f"data.eval={DATASETS / 'banking77' / 'test.csv'}", "data.text_column=text",
        "data.label_column=category", f"data.max_eval_records={a.eval_records}",
        f"data.max_records_per_site={a.records}", "data.partition=dirichlet",
        "data.dirichlet_alpha=1.0", f"federation.num_sites={a.sites}",
        f"federation.rounds={a.rounds}", f"train.local_steps={a.steps}",
        f"train.batch_size={a.batch}", f"train.lr={a.lr}", f"train.threads={a.threads}",
        f"federation.parallel_sites={a.parallel}", f"dp.target_epsilon={a.epsilon}",
        f"federation.update_encoding={enc}", f"output.dir={out}", f"output.run_name={name}",
        "model.max_length=64",
    ]
    cmd = [sys.executable, "-m", "fedtune", "simulate"]
    for s in sets:
        cmd += ["--set", s]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"simulate ({enc}) failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    records = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["round"] > 0]
    per_site = [r["aggregation"]["upload_bytes"] / r["aggregation"]["sites"] for r in trained]
    # Sites do not send their payload size (common/disclosure.py): read it from their ledgers.
    site_bytes = [p.bytes for f in sorted((out / name).rglob(PrivacyLedger.FILENAME))
                  for p in PrivacyLedger.from_file(f).payloads() if p.status == "ok"]
    return {"encoding": enc, "wall_s": wall, "accuracy": records[-1]["eval"]["accuracy"],
            "macro_f1": records[-1]["eval"]["macro_f1"],
            "accuracy_by_round": [r["eval"]["accuracy"] for r in records if "eval" in r],
            "upload_bytes_per_site_round": float(np.mean(per_site)),
            "ledger_payload_bytes": float(np.mean(site_bytes)),
            "epsilon": max((s.get("epsilon", 0.0) for r in trained for s in r["sites"]),
                           default=None)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--records", type=int, default=3000, help="max records per site")
    p.add_argument("--eval-records", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--out", default="/tmp/fedtune-bench/comm")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    load0 = os.getloadavg()[0]
    rows = sizes_table(["all-minilm-l6-v2", "smollm2-135m-instruct"])
    print("Upload per site per round (serialised as sent), vs raw fp32 of FedAvg-LoRA's tensors")
    for r in rows:
        print(f"  {r['model']:22s} {r['strategy']:9s} {r['encoding']:5s} {r['tensors']:3d} tensors "
              f"{r['params']:9d} params  {r['bytes']:10d} B  {r['vs_fp32_raw']:.3f}x")
    runs = []
    if not a.skip_training:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for enc in ENCODINGS:
            runs.append(simulate(enc, a, out))
            r = runs[-1]
            print(f"  ran {enc}: accuracy {r['accuracy']:.4f} in {r['wall_s']:.0f} s", flush=True)
        ref = runs[0]
        print(f"\nBanking77 / MiniLM, {a.sites} sites (Dirichlet 1.0), {a.rounds} rounds x "
              f"{a.steps} DP steps, batch {a.batch}, eps {a.epsilon}, "
              f"{a.eval_records} test records")
        for r in runs:
            print(f"  {r['encoding']:5s} accuracy {r['accuracy']:.4f} "
                  f"({100 * (r['accuracy'] - ref['accuracy']):+.2f} pt)  macro-F1 "
                  f"{r['macro_f1']:.4f}  upload/site/round {r['upload_bytes_per_site_round']:.0f} B"
                  f" ({r['upload_bytes_per_site_round'] / ref['upload_bytes_per_site_round']:.3f}"
                  f"x fp32)  wall {r['wall_s']:.0f} s  by round "
                  + " ".join(f"{x:.3f}" for x in r["accuracy_by_round"]))
    load1 = os.getloadavg()[0]
    print(f"load average: start {load0:.2f}, end {load1:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"sizes": rows, "runs": runs,
                                            "load": [load0, load1]}, indent=1))


if __name__ == "__main__":
    main()
