"""Where a site process's memory goes: resident memory after each phase of one round of local
DP-SGD, in this one process (no Ray), one torch thread.

Phases: the imported stack (torch, transformers, PEFT, Opacus, Flower), the model with LoRA, the
site's tokenized data, then `train_local` (peak and after). Activations of the frozen encoder
are kept for the backward pass through the LoRA layers of every block, so training's share
grows with model.max_length and train.chunk_tokens (how many tokens one forward pass holds).

    .venv/bin/python -m benchmarks.bench_site_memory_phases --data train.jsonl --max-length 512
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path


def _mb() -> tuple[float, float]:
    """(current resident, peak resident) of this process in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="classification .jsonl")
    ap.add_argument("--records", type=int, default=462, help="the site's records (first N)")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=1)
    a = ap.parse_args()
    phases = [("start", *_mb())]
    import flwr  # noqa: F401
    import opacus  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    phases.append(("imports", *_mb()))
    from fedtune.client.trainer import train_local
    from fedtune.common.config import load_config
    from fedtune.common.data import read_records
    from fedtune.common.model_cache import get_runtime
    from fedtune.common.tasks import encode_records, num_labels, resolve_task

    records = read_records(a.data)[: a.records]
    labels = sorted({str(r.fields["label"]) for r in records})
    cfg = load_config(None, ["model.name=all-minilm-l6-v2", f"model.max_length={a.max_length}",
                             f"data.labels={json.dumps(labels)}", f"train.batch_size={a.batch}",
                             f"train.chunk_tokens={a.chunk_tokens}"])
    torch.set_num_threads(1)
    task = resolve_task(cfg)
    rt = get_runtime(cfg, task, num_labels(cfg, task))
    phases.append(("model + LoRA", *_mb()))
    data = encode_records(records, rt.tokenizer, cfg, task, cfg.data.labels)
    phases.append((f"data ({len(data)} records)", *_mb()))
    started = time.time()
    train_local(rt.model, data, task=task, pad_id=rt.pad_id, device=rt.device, train=cfg.train,
                dp=cfg.dp, noise_multiplier=1.0, steps=a.steps)
    phases.append((f"after {a.steps} DP step(s), {time.time() - started:.0f} s", *_mb()))
    print(f"max_length {a.max_length}, batch {a.batch}, chunk_tokens {a.chunk_tokens}:")
    for name, cur, peak in phases:
        print(f"  {name:32s} resident {cur:6.0f} MB   peak so far {peak:6.0f} MB")


if __name__ == "__main__":
    main()
