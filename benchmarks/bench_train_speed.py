"""Local training speed: tokens/s of fedtune's DP-LoRA vs non-DP LoRA vs a Hugging Face Trainer.

Every variant trains the same PEFT model on the same encoded records with the same (expected)
batch size, through the real code paths:

- ``fedtune``       client/trainer.py::train_local, dp.enabled = false
- ``fedtune-dp``    train_local with Opacus DP-SGD (Poisson sampling, clipping, noise)
- ``hf-trainer``    transformers.Trainer + PEFT LoRA, non-DP (the FlowerTune LLM client recipe),
                    same collator (dynamic padding), same optimizer (AdamW) and lr
- ``fedtune-dp-whole`` fedtune-dp with ``train.chunk_tokens = 0``: each batch in one pass,
                    padded to its longest example (the "before" of length chunks)
- ``fedtune-dp-hooks`` fedtune-dp with per-example gradients from Opacus' module hooks
                    (``grad_sample_mode="hooks"``), the "before" of client/linear_grad_sample.py
- ``fedtune-dp-logits`` (causal LM) fedtune-dp with the labelled positions' logits built in full
                    and passed to F.cross_entropy, the "before" of common/head_loss.py
- ``*-fullhead``    (causal LM) the same two fedtune variants with the former loss, which applied
                    the LM head at every position: the "before" of the logits-only-where-labels
                    change (common/tasks.py::label_token_losses)

Tokens are the real (non-padding) tokens of the examples each variant actually drew (Poisson
batches vary in size), counted as the data loader fetches them. Variants run interleaved,
`--reps` times, so background load hits them alike; the median is reported, with ratios.
FLOPs per token are counted with torch.utils.flop_counter on one forward+backward of each of the
first (up to 64) examples alone, so that padding is not counted as work; the achieved FLOP/s
is compared with this machine's fp32 matmul peak measured in the same run.

    python benchmarks/bench_train_speed.py --model all-minilm-l6-v2 --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import fedtune.client.trainer as trainer_mod
import fedtune.common.tasks as tasks_mod
from fedtune.client.trainer import train_local
from fedtune.common.config import RunConfig, load_config
from fedtune.common.data import IGNORE_INDEX, EncodedDataset, PadCollator, read_records
from fedtune.common.model_cache import get_runtime
from fedtune.common.tasks import encode_records, num_labels, per_sample_loss, resolve_task

DATASETS = Path(os.environ.get("FEDTUNE_DATASETS",
                               Path(__file__).resolve().parents[2] / "shared" / "datasets"))


class CountingDataset(torch.utils.data.Dataset):
    """Counts the real tokens of every example a loader fetches."""

    def __init__(self, base: EncodedDataset) -> None:
        self.base, self.tokens, self.examples = base, 0, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        self.tokens += len(item["input_ids"])
        self.examples += 1
        return item

    def reset(self) -> None:
        self.tokens = self.examples = 0


def full_head_per_sample_loss(model, batch, task):
    """The loss before the change: LM head at every position, unlabelled ones ignored."""
    if task == "classification":
        return per_sample_loss(model, batch, task)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits.float()
    labels = batch["labels"][:, 1:]
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    return tok.sum(dim=1) / (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)


def logits_per_sample_loss(model, batch, task):
    """The loss before common/head_loss.py: the labelled positions' logits tensor in full."""
    fused = tasks_mod.frozen_head_cross_entropy
    tasks_mod.frozen_head_cross_entropy = lambda hidden, head, labels: F.cross_entropy(
        head(hidden).float(), labels, reduction="none")
    try:
        return per_sample_loss(model, batch, task)
    finally:
        tasks_mod.frozen_head_cross_entropy = fused


def matmul_peak(threads: int | None, n: int = 2048, reps: int = 10,
                device: torch.device = torch.device("cpu"),
                dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of an n x n matmul in `dtype` on `device` (with `threads` CPU threads, unless
    None)."""
    if threads is not None:
        torch.set_num_threads(threads)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def model_config(name: str, max_length: int, batch: int, threads: int) -> tuple[RunConfig, list]:
    if name == "all-minilm-l6-v2":
        path = DATASETS / "banking77" / "train.csv"
        sets = ["data.text_column=text", "data.label_column=category"]
    else:
        path = DATASETS / "medquad" / "medquad.jsonl"
        sets = ["data.input_key=question", "data.output_key=answer"]
    records = read_records(path)
    cfg = load_config(overrides=[
        f"model.name={name}", f"model.max_length={max_length}", f"train.batch_size={batch}",
        f"train.threads={threads}", "train.lr=1e-4", "model.device=cpu", "model.dtype=float32",
        *sets,
    ])
    if resolve_task(cfg) == "classification":
        labels = sorted({str(r.fields["category"]) for r in records})
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": labels})})
    return cfg, records


def flops_per_token(model, data: EncodedDataset, pad_id: int, task: str, n: int,
                    device: torch.device = torch.device("cpu")) -> float:
    """Counted FLOPs of one forward + backward (fedtune's loss) per real token, each of the first
    `n` examples run alone: the work the tokens need, with no padding counted as work."""
    flops = tokens = 0
    for i in range(min(n, len(data))):
        b = {k: v.to(device) for k, v in PadCollator(pad_id)([data[i]]).items()}
        with FlopCounterMode(display=False) as fc:
            per_sample_loss(model, b, task).mean().backward()
        flops += fc.get_total_flops()
        tokens += int(b["attention_mask"].sum())
    model.zero_grad(set_to_none=True)
    return flops / tokens


def hf_trainer_run(model, data: CountingDataset, pad_id: int, task: str, cfg: RunConfig,
                   steps: int, seed: int, out_dir: Path) -> None:
    from transformers import Trainer, TrainingArguments

    collate = PadCollator(pad_id)
    # accelerate's loader fetches one batch ahead (to spot the last one), so counting what the
    # loader fetched would over-count: count the tokens of the batches the model actually ran.
    fetched: list[int] = []
    fed = [0]

    def collator(items):
        b = collate(items)  # labels: class ids, or token labels (-100 on prompt/padding)
        fetched.append(int(b["attention_mask"].sum()))
        return b

    hook = model.get_input_embeddings().register_forward_pre_hook(
        lambda *_: fed.__setitem__(0, fed[0] + 1)
    )

    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=cfg.train.batch_size,
        max_steps=steps, learning_rate=cfg.train.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, optim="adamw_torch", logging_strategy="no",
        save_strategy="no", report_to=[], disable_tqdm=True, seed=seed, use_cpu=True,
        dataloader_num_workers=0, remove_unused_columns=False,
    )
    # The dequantized SmolLM2 cache keeps GGUF's quantization_config in its config.json, and the
    # Trainer refuses "GGUF-quantized" models; the weights are plain float32, so lift the flag.
    base = model.get_base_model()
    saved = {k: getattr(base, k) for k in ("is_quantized", "hf_quantizer") if hasattr(base, k)}
    for k in saved:
        setattr(base, k, False if k == "is_quantized" else None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Trainer(model=model, args=args, train_dataset=data, data_collator=collator).train()
    finally:
        hook.remove()
        for k, v in saved.items():
            setattr(base, k, v)
    model.train()
    data.tokens = sum(fetched[: fed[0]])
    data.examples = -1  # not tracked for the Trainer


def bench_model(name: str, a: argparse.Namespace) -> dict:
    cfg, records = model_config(name, a.max_length, a.batch, a.threads)
    task = resolve_task(cfg)
    rt = get_runtime(cfg, task, num_labels(cfg, task))
    torch.set_num_threads(a.threads)
    encoded = encode_records(records[: a.records], rt.tokenizer, cfg, task, cfg.data.labels)
    data = CountingDataset(encoded)
    labelled = (sum(sum(x != IGNORE_INDEX for x in it["labels"][1:]) for it in encoded.items)
                / sum(len(it["input_ids"]) for it in encoded.items)
                if task == "causal_lm" else None)
    dp_on = cfg.dp.model_copy(update={"enabled": True})
    dp_off = cfg.dp.model_copy(update={"enabled": False})

    whole = cfg.train.model_copy(update={"chunk_tokens": 0})

    def fedtune(dp, loss, train=cfg.train, grad_samples="auto") -> Callable[[int], None]:
        def run(seed: int) -> None:
            trainer_mod.per_sample_loss = loss
            try:
                train_local(rt.model, data, task=task, pad_id=rt.pad_id, device=rt.device,
                            train=train, dp=dp, noise_multiplier=a.noise, steps=a.steps,
                            seed=seed, grad_sample_mode=grad_samples)
            finally:
                trainer_mod.per_sample_loss = per_sample_loss
        return run

    variants: dict[str, Callable[[int], None]] = {
        "fedtune": fedtune(dp_off, per_sample_loss),
        "fedtune-dp": fedtune(dp_on, per_sample_loss),
        "fedtune-dp-hooks": fedtune(dp_on, per_sample_loss, grad_samples="hooks"),
        "fedtune-dp-whole": fedtune(dp_on, per_sample_loss, whole),
        "hf-trainer": lambda seed: hf_trainer_run(rt.model, data, rt.pad_id, task, cfg, a.steps,
                                                  seed, Path(a.tmp) / "hf"),
    }
    if task == "causal_lm":
        variants["fedtune-fullhead"] = fedtune(dp_off, full_head_per_sample_loss)
        variants["fedtune-dp-fullhead"] = fedtune(dp_on, full_head_per_sample_loss)
        variants["fedtune-dp-logits"] = fedtune(dp_on, logits_per_sample_loss)
    if a.only:  # fedtune and fedtune-dp always run: every ratio is read against them
        if unknown := set(a.only) - set(variants):
            raise SystemExit(f"--only: no variant {', '.join(sorted(unknown))} for {name}; "
                             f"choose from {', '.join(variants)}")
        keep = {"fedtune", "fedtune-dp", *a.only}
        variants = {k: v for k, v in variants.items() if k in keep}

    fpt = flops_per_token(rt.model, encoded, rt.pad_id, task, min(a.batch, 64))
    for run in variants.values():  # warm-up (allocators, Opacus, Trainer imports)
        run(12345)
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(a.reps):
        for key, run in variants.items():
            data.reset()
            t = time.perf_counter()
            run(rep)
            dt = time.perf_counter() - t
            rates[key].append(data.tokens / dt)
    med = {k: statistics.median(v) for k, v in rates.items()}
    best = {k: max(v) for k, v in rates.items()}
    return {"model": name, "task": task, "tokens_per_s": med, "best": best, "runs": rates,
            "flops_per_token": fpt, "labelled_fraction": labelled,
            "mean_tokens_per_example": sum(len(i["input_ids"]) for i in encoded.items)
            / len(encoded)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=None)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per timed run")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--tmp", default="/tmp/fedtune-bench")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--only", action="append", default=None, metavar="VARIANT",
                   help="run only fedtune, fedtune-dp and these variants (repeatable; e.g. "
                        "hf-trainer, fedtune-dp-whole): more repetitions in the same time")
    a = p.parse_args()
    models = a.model or ["all-minilm-l6-v2", "smollm2-135m-instruct"]
    load0 = os.getloadavg()
    peak0 = matmul_peak(a.threads)
    results = [bench_model(m, a) for m in models]
    peak1 = matmul_peak(a.threads)
    peak = max(peak0, peak1)
    load1 = os.getloadavg()
    print(f"fp32 matmul peak ({a.threads} threads, 2048^3): {peak0:.1f} / {peak1:.1f} GFLOP/s "
          f"(start / end); using {peak:.1f}")
    print(f"load average at start {load0[0]:.2f}, at end {load1[0]:.2f}")
    for r in results:
        tps, best = r["tokens_per_s"], r["best"]
        print(f"\n{r['model']} ({r['task']}), batch {a.batch}, {a.steps} steps/run, "
              f"median of {a.reps}; {r['mean_tokens_per_example']:.1f} tokens/example"
              + (f", {r['labelled_fraction']:.0%} labelled" if r["labelled_fraction"] else ""))
        print(f"  counted {r['flops_per_token'] / 1e6:.1f} MFLOP/token (fwd+bwd, fedtune loss)")
        for k, v in tps.items():
            gf = v * r["flops_per_token"] / 1e9
            print(f"  {k:20s} {v:8.1f} tokens/s (best {best[k]:7.1f}) {gf:6.1f} GFLOP/s"
                  f" = {gf / peak:.2f} of peak"
                  f"   runs: {', '.join(f'{x:.0f}' for x in r['runs'][k])}")
        # Each DP run against the non-DP run just before it: on a VM the speed of the same work
        # can drift by +-25 % over minutes (RESULTS.md), and a pair shares one stretch of it.
        runs = r["runs"]
        paired = statistics.median(d / n for d, n in zip(runs["fedtune-dp"], runs["fedtune"],
                                                          strict=True))
        print(f"  [paired] DP / non-DP (fedtune), median of the {len(runs['fedtune'])} "
              f"run-by-run ratios: {paired:.3f} (target >= 0.95)")
        if "fedtune-dp-logits" in runs:
            logits = statistics.median(d / h for d, h in zip(runs["fedtune-dp"],
                                                             runs["fedtune-dp-logits"],
                                                             strict=True))
            print(f"  [paired] DP chunked head cross-entropy / full logits: {logits:.3f}x")
        if "fedtune-dp-hooks" in runs:
            hooks = statistics.median(d / h for d, h in zip(runs["fedtune-dp"],
                                                            runs["fedtune-dp-hooks"], strict=True))
            print(f"  [paired] DP own per-example gradients / Opacus' hooks: {hooks:.3f}x")
        for label, t in (("median", tps), ("best run", best)):
            print(f"  [{label}] DP / non-DP (fedtune) {t['fedtune-dp'] / t['fedtune']:.3f}"
                  " (target >= 0.95)")
            if "hf-trainer" in t:
                print(f"  [{label}] fedtune DP / HF Trainer non-DP "
                      f"{t['fedtune-dp'] / t['hf-trainer']:.3f} (target >= 0.9)")
            if "fedtune-dp-hooks" in t:
                print(f"  [{label}] DP per-example gradients: fedtune's own "
                      f"{t['fedtune-dp'] / t['fedtune-dp-hooks']:.3f}x Opacus' hooks")
            if "fedtune-dp-logits" in t:
                print(f"  [{label}] chunked head cross-entropy: DP "
                      f"{t['fedtune-dp'] / t['fedtune-dp-logits']:.3f}x the full logits tensor")
            if "fedtune-dp-whole" in t:
                print(f"  [{label}] length chunks: DP "
                      f"{t['fedtune-dp'] / t['fedtune-dp-whole']:.3f}x "
                      "the whole batch padded to its longest")
            if "fedtune-fullhead" in t and "fedtune-dp-fullhead" in t:
                print(f"  [{label}] labelled-only LM head speed-up: non-DP "
                      f"{t['fedtune'] / t['fedtune-fullhead']:.3f}x, DP "
                      f"{t['fedtune-dp'] / t['fedtune-dp-fullhead']:.3f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"peak_gflops": peak, "load": [load0, load1],
                                            "results": results}, indent=1))


if __name__ == "__main__":
    main()
