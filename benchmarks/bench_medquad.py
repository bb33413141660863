"""MedQuAD across the 9 NIH sources: does federated DP fine-tuning beat each site alone?

The cross-hospital benchmark, run only through what a user can reach: every trained row is
one real `fedtune simulate` (subprocess, fedtune's own config keys passed as `--set`), and
every row is measured with `fedtune.load(run_dir)` (`.evaluate`, `.generate`).

Data: ../shared/datasets/medquad/medquad.jsonl (16,407 question-answer pairs, 9 sources). Each
source is one site (`data.partition = "column"`, `data.partition_column = "source"`), with
all its records. A seeded 5 % of every source (at least MIN_HELD records) is held out before
anything trains and is never trained on; the per-source held-out files are what the rows are
compared on.

Rows: the base model (no training: the LoRA adapter of a loaded run switched off, which is what
LoRA's B = 0 start is); each site alone (`federation.num_sites = 1` on that source's training
records), without DP and with DP at ε = 8; federated without DP; federated with DP at
ε ∈ {1, 3, 8}; centralized without DP (one site holding every training record). Compute parity:
a site trains `rounds x local_steps x batch_size` example-gradients in every site-alone and
federated row, so a federated row costs the sum of the nine site-alone runs; the centralized
row gets that same total as one site with a batch 9x as large (same rounds and steps).

Metrics: answer-token loss (the training loss: prompt tokens are not scored) and perplexity
per source and pooled, and ROUGE-L F1 of greedy answers. "Pooled" is the mean of the
per-source losses weighted by each source's held-out record count, so a capped evaluation
(`--eval-per-source`, a seeded sample of each source's held-out records) still estimates the
loss over the whole held-out set. ROUGE-L: greedy decoding with a fixed budget of `--gen-tokens`
new tokens on `--gen-questions` held-out questions per source, scored against the reference
answer cut to its first `--gen-tokens` tokens (what the budget could reproduce). A site-alone
model answers only its own source's questions and the loss table evaluates it on every source,
as the targets need its pooled loss.

Every recipe knob is in RECIPE below (one place), passed to every run as `--set`; the
benchmark's own `--set KEY=VALUE` overrides them for one invocation. ε and δ in the report are
what each run's sites reported in metrics.jsonl (the ledger's figures), not what was asked.

    .venv/bin/python benchmarks/bench_medquad.py           # full: writes results/medquad.*
    .venv/bin/python benchmarks/bench_medquad.py --quick   # 3 sources: results/medquad_quick.*
    .venv/bin/python benchmarks/bench_medquad.py --smoke --out /tmp/mq   # CI: 2 runs
    .venv/bin/python benchmarks/bench_medquad.py --ablation --set lora.r=2 --out /tmp/r2
    .venv/bin/python benchmarks/bench_medquad.py --set train.lr=1e-3 --work /tmp/mqwork
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FEDTUNE_DATASETS", REPO.parent / "shared" / "datasets")) / "medquad"
RESULTS = REPO / "results"

# The recipe of every trained row: fedtune config keys, passed as `--set KEY=VALUE`. Change it
# here (or with the benchmark's own --set). None leaves the key at fedtune's default.
RECIPE: dict[str, Any] = {
    # How these values were chosen; the report prints it. No DP setting was tried on MedQuAD.
    "provenance": "docs/privacy.md's DP recipe, fixed on the embedded cases before this "
                  "benchmark ran: AdamW with train.lr = \"auto\" (0.05 / sqrt(rounds x local "
                  "steps) with DP, 0.05 / (rounds x local steps, at least 4) without; "
                  "common/step_size.py), "
                  "expected batch 64, 4 rounds x 3 local steps; LoRA rank and target modules at "
                  "fedtune's defaults (PEFT's q_proj, v_proj); the PRV accountant (a tighter bound "
                  "of the same mechanism); model.max_length 256 from the answers' length "
                  "distribution (not their content). No DP setting was tried on the sites' "
                  "records; how each mode cuts the compute is stated under the table, with "
                  "the one choice made after a run on these sources.",
    "sets": {
        "model.max_length": 256,
        "train.optimizer": "adamw",
        "train.lr": "auto",
        "train.batch_size": 64,
        "train.local_steps": 3,
        "federation.rounds": 4,
        "federation.strategy": "fedavg",  # "ffa_lora" trains and sends only LoRA's B
        "lora.r": 8,
        "lora.alpha": 16.0,
        "lora.target_modules": None,  # None: PEFT's default (q_proj, v_proj for SmolLM2)
        "dp.accountant": "prv",
        "dp.max_grad_norm": 1.0,
        "dp.delta": 1e-5,
    },
}
SITE_DP_EPSILON = 8.0  # the site-alone DP row, and the federated ε the targets compare
MIN_HELD = 5  # held-out records per source at least (CDC has 270 records: 5 % is 13)
HELD_FRACTION = 0.05


@dataclass(frozen=True)
class Mode:
    """How much of the benchmark one invocation runs."""

    sources: tuple[str, ...] | None  # None: all sources in the file
    epsilons: tuple[float, ...]  # federated DP rows
    site_rows: bool  # the site-alone rows (2 runs per source)
    central: bool
    eval_per_source: int
    gen_questions: int
    gen_tokens: int
    server_eval: int  # records the server itself evaluates before and after (invariant check)
    sets: dict[str, Any] = field(default_factory=dict)  # shrinks RECIPE's compute
    compute: str = ""  # why and how `sets` shrinks it (printed in the report)
    fed_nodp: bool = True  # the federated no-DP row


MODES = {
    # The DP recipe's own compute (batch 64 x 12 steps = 768 example-gradients per site at 256
    # tokens) would take days on 2 CPU cores: ~0.7 s per SmolLM2 DP example-gradient at 128
    # tokens (measured alone on the machine), 63 x the per-site amount over the 23 runs, plus
    # ~25 s per `fedtune simulate` and each row's evaluation. Fitted to <= 2 h by that cost:
    # batch 16, 2 rounds x 2 local steps, 128 tokens (64 example-gradients per site). Not fewer
    # than 4 steps: at 2 steps the no-DP form of the "auto" rule (0.05 / 2: every weight moved
    # by 0.025 per AdamW step) sent the no-DP rows far above the base model (a quick run on
    # these sources), so the reference rows would have measured a divergence.
    "full": Mode(None, (1.0, 3.0, 8.0), True, True, eval_per_source=6, gen_questions=1,
                 gen_tokens=48, server_eval=2,
                 sets={"federation.rounds": 2, "train.local_steps": 2, "train.batch_size": 16,
                       "model.max_length": 128},
                 compute="the DP recipe's compute (batch 64 x 4 rounds x 3 steps at 256 tokens) "
                         "cut to fit 2 h on 2 CPU cores by the measured cost per "
                         "example-gradient: batch 16, 2 rounds x 2 steps, 128 tokens. The "
                         "schedule was first 2 rounds x 1 step at batch 32; a quick run on "
                         "these sources at 2 steps sent the no-DP rows above the base model "
                         "(the no-DP rule's 0.025 AdamW step), so 4 steps is a choice made "
                         "after seeing site records: ε does not cover it"),
    # <= 10 min: the three smallest sources, 2 rounds x 2 steps of 4 examples at 64 tokens, one
    # federated DP row (ε = 8): each `fedtune simulate` costs ~25 s before it trains.
    "quick": Mode(("CDC", "NHLBI", "CancerGov"), (SITE_DP_EPSILON,), True, True,
                  eval_per_source=3, gen_questions=1, gen_tokens=16, server_eval=1,
                  sets={"federation.rounds": 2, "train.local_steps": 2, "train.batch_size": 4,
                        "model.max_length": 64},
                  compute="cut to finish in 10 min: 3 sources, batch 4, 2 rounds x 2 steps, "
                          "64 tokens (4 steps, as in the full mode), federated DP at ε = 8 "
                          "only"),
    # CI: the same code path on 2 sources, 2 runs (federated without DP and with DP ε = 8).
    "smoke": Mode(("CDC", "NHLBI"), (8.0,), False, False, eval_per_source=2, gen_questions=1,
                  gen_tokens=8, server_eval=1,
                  sets={"federation.rounds": 1, "train.local_steps": 1, "train.batch_size": 2,
                        "model.max_length": 64},
                  compute="CI smoke: 2 sources, batch 2, 1 round x 1 step, 64 tokens"),
}
# One setting against the full table: the full mode's federated DP ε = 8 row alone (and the
# base model), run with the benchmark's --set on top of the recipe.
MODES["ablation"] = replace(MODES["full"], epsilons=(SITE_DP_EPSILON,), site_rows=False,
                            central=False, fed_nodp=False)
# Each mode's report and plot (smoke and ablation write only into their own --out).
REPORT_STEM = {"full": "medquad", "quick": "medquad_quick", "smoke": "medquad",
               "ablation": "medquad"}


# --- data ------------------------------------------------------------------------------------

@dataclass
class Split:
    """The benchmark's files in the work directory."""

    sources: list[str]
    train: Path  # every source's training records (the federated and centralized rows)
    site_train: dict[str, Path]
    eval_files: dict[str, Path]  # the evaluated (capped) held-out records of each source
    pooled_eval: Path  # their union: the server's data.eval
    held_counts: dict[str, int]  # all held-out records per source (the pooled weights)
    train_counts: dict[str, int]
    gen_items: list[dict]  # held-out questions answered by every row


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def split_data(path: Path, folder: Path, mode: Mode, seed: int) -> Split:
    """Seeded per-source train / held-out split; held-out records never reach a site."""
    by_source: dict[str, list[dict]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            by_source.setdefault(rec["source"], []).append(rec)
    sources = sorted(by_source, key=lambda s: (-len(by_source[s]), s))
    if mode.sources is not None:
        missing = set(mode.sources) - set(sources)
        if missing:
            raise SystemExit(f"{path}: no records of source(s) {sorted(missing)}")
        sources = [s for s in sources if s in mode.sources]
    train_all: list[dict] = []
    split = Split(sources, folder / "train.jsonl", {}, {}, folder / "eval_pooled.jsonl", {}, {},
                  [])
    pooled: list[dict] = []
    for s in sources:
        recs = list(by_source[s])
        random.Random(f"{seed}:{s}").shuffle(recs)  # per source: adding one changes no other
        n_held = max(MIN_HELD, round(HELD_FRACTION * len(recs)))
        held, train = recs[:n_held], recs[n_held:]
        _write(folder / "heldout" / f"{s}.jsonl", held)
        split.site_train[s] = folder / "train" / f"{s}.jsonl"
        _write(split.site_train[s], train)
        evaluated = held[:mode.eval_per_source]  # held is already a seeded shuffle
        split.eval_files[s] = folder / "eval" / f"{s}.jsonl"
        _write(split.eval_files[s], evaluated)
        split.held_counts[s], split.train_counts[s] = len(held), len(train)
        split.gen_items += evaluated[:mode.gen_questions]
        train_all += train
        pooled += evaluated
    random.Random(seed).shuffle(train_all)
    _write(split.train, train_all)
    _write(split.pooled_eval, pooled)
    return split


# --- runs --------------------------------------------------------------------------------------

def _toml(value: Any) -> str:
    """A --set value as TOML (fedtune parses it so): strings and lists quoted, bools lower."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, list)):
        return json.dumps(value)
    return repr(value)


def recipe_sets(mode: Mode, extra: list[str]) -> list[str]:
    """RECIPE, shrunk by the mode, then the command line's --set (last wins in fedtune)."""
    merged = {**RECIPE["sets"], **mode.sets}
    return [f"{k}={_toml(v)}" for k, v in merged.items() if v is not None] + extra


@dataclass
class RunResult:
    run_dir: Path
    train_s: float
    metrics: list[dict]
    reused: bool


def _finished(run_dir: Path) -> list[dict] | None:
    """metrics.jsonl of a run that completed every round (reused with --work), else None."""
    from fedtune.common.config import load_config
    from fedtune.common.round_record import read_rounds

    if not (run_dir / "adapter" / "adapter_model.safetensors").is_file():
        return None
    rounds = load_config(run_dir / "config.toml").federation.rounds
    records = read_rounds(run_dir)
    return records if records and records[-1].get("round") == rounds else None


def simulate(name: str, sets: list[str], runs: Path) -> RunResult:
    """One `fedtune simulate` (the real CLI, fresh Ray) into runs/<name>."""
    run_dir = runs / name
    done = _finished(run_dir)
    if done is not None:
        return RunResult(run_dir, float("nan"), done, True)
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run: fedtune refuses the dir
    cmd = [sys.executable, "-m", "fedtune", "simulate",
           *[a for s in [*sets, f"output.dir={runs}", f"output.run_name={name}"]
             for a in ("--set", s)]]
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "160"})
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: fedtune simulate exited {proc.returncode}\n"
                           f"{shlex.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")
    done = _finished(run_dir)
    if done is None:
        raise RuntimeError(f"{name}: the run did not finish its rounds ({run_dir})")
    return RunResult(run_dir, wall, done, False)


def spent(metrics: list[dict]) -> dict[str, float | None]:
    """The largest ε any site reported for the run, and its δ (None: DP off)."""
    sites = [s for r in metrics for s in r.get("sites", []) if s.get("epsilon") is not None]
    if not sites:
        return {"epsilon": None, "delta": None}
    last: dict[str, dict] = {}
    for s in sites:  # a site's last report covers the whole run so far
        last[s["site_id"]] = s
    return {"epsilon": max(float(s["epsilon"]) for s in last.values()),
            "delta": max(float(s["delta"]) for s in last.values())}


def example_gradients(run_dir: Path) -> dict[str, int]:
    """Expected example-gradients, from the run's own config.toml (Poisson batches: the
    expected batch size)."""
    from fedtune.common.config import load_config

    cfg = load_config(run_dir / "config.toml")
    per_site = cfg.federation.rounds * cfg.train.local_steps * cfg.train.batch_size
    return {"per_site": per_site, "sites": cfg.federation.num_sites,
            "total": per_site * cfg.federation.num_sites}


# --- measuring -------------------------------------------------------------------------------

def rouge_l(prediction: str, reference: str) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(scorer.score(reference, prediction)["rougeL"].fmeasure)


def measure(loaded: Any, split: Split, mode: Mode, gen_items: list[dict],
            base: bool = False) -> dict:
    """Per-source answer loss, generated answers and their ROUGE-L, for one model. `base`:
    with the run's LoRA adapter switched off (the pretrained model)."""
    ctx = loaded.model.disable_adapter() if base else contextlib.nullcontext()
    tok = loaded.tokenizer
    out: dict[str, Any] = {"per_source": {}, "answers": []}
    with ctx:
        started = time.time()
        for s in split.sources:
            out["per_source"][s] = loaded.evaluate(split.eval_files[s])["loss"]
        out["eval_s"] = time.time() - started
        started = time.time()
        for item in gen_items:
            answer = loaded.generate(item["question"], max_new_tokens=mode.gen_tokens)
            ref_ids = tok(item["answer"], add_special_tokens=False)["input_ids"][:mode.gen_tokens]
            out["answers"].append({"source": item["source"], "answer": answer,
                                   "rouge_l": rouge_l(answer, tok.decode(ref_ids))})
        out["gen_s"] = time.time() - started
    weights = {s: split.held_counts[s] for s in split.sources}
    out["pooled_loss"] = sum(weights[s] * out["per_source"][s] for s in weights) / sum(
        weights.values())
    out["rouge_l"] = (sum(a["rouge_l"] for a in out["answers"]) / len(out["answers"])
                      if out["answers"] else None)
    return out


def invariants(loaded: Any, metrics: list[dict]) -> dict[str, float]:
    """The loaded model against the server's own evaluation of the same records (the run's
    eval.jsonl): adapter off = the initial adapter of round 0, adapter on = the last round."""
    started = time.time()
    evals = [r["eval"]["loss"] for r in metrics if "eval" in r]
    with loaded.model.disable_adapter():
        base = loaded.evaluate()["loss"]
    final = loaded.evaluate()["loss"]
    return {"server_before": evals[0], "loaded_base": base,
            "server_after": evals[-1], "loaded_final": final,
            "seconds": time.time() - started}


# --- the benchmark ---------------------------------------------------------------------------

@dataclass
class Plan:
    key: str
    label: str
    sets: list[str]
    gen_sources: list[str] | None  # None: every generation question


def plan_rows(split: Split, mode: Mode, recipe: list[str]) -> list[Plan]:
    """Every trained row, in the order they run (federated first: the base row uses its model)."""
    n = len(split.sources)
    data_common = [f"data.eval={split.pooled_eval}", "data.input_key=question",
                   "data.output_key=answer", f"data.max_eval_records={mode.server_eval}"]
    # The server evaluates before the first round and after the last only: the benchmark
    # measures each row itself.
    big = "federation.evaluate_every=1000000"
    fed = [f"data.train={split.train}", "data.partition=column",
           "data.partition_column=source", f"federation.num_sites={n}"]
    rows = [Plan("fed/nodp", "federated, no DP", [*recipe, *data_common, *fed, big,
                                                  "dp.enabled=false"], None)]
    if not mode.fed_nodp:
        rows = []
    for eps in mode.epsilons:
        rows.append(Plan(f"fed/dp{eps:g}", f"federated, DP ε = {eps:g}",
                         [*recipe, *data_common, *fed, big, "dp.enabled=true",
                          f"dp.target_epsilon={eps!r}"], None))
    if mode.site_rows:
        for s in split.sources:
            alone = [f"data.train={split.site_train[s]}", "data.partition=iid",
                     "federation.num_sites=1"]
            rows.append(Plan(f"alone/{s}/nodp", f"{s} alone, no DP",
                             [*recipe, *data_common, *alone, big, "dp.enabled=false"], [s]))
            rows.append(Plan(f"alone/{s}/dp{SITE_DP_EPSILON:g}",
                             f"{s} alone, DP ε = {SITE_DP_EPSILON:g}",
                             [*recipe, *data_common, *alone, big, "dp.enabled=true",
                              f"dp.target_epsilon={SITE_DP_EPSILON!r}"], [s]))
    if mode.central:
        from fedtune.common.config import load_config

        batch = load_config(overrides=recipe).train.batch_size  # the effective batch size
        rows.append(Plan("central/nodp", "centralized, no DP",
                         [*recipe, *data_common, f"data.train={split.train}",
                          "data.partition=iid", "federation.num_sites=1",
                          f"train.batch_size={batch * n}", big, "dp.enabled=false"], None))
    return rows


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    import torch

    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gib": mem,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__}


def run_benchmark(mode_name: str, mode: Mode, extra_sets: list[str], work: Path,
                  log: Any = print) -> dict:
    import fedtune

    started_all = time.time()
    split = split_data(DATA / "medquad.jsonl", work / "data", mode, seed=0)
    recipe = recipe_sets(mode, extra_sets)
    plans = plan_rows(split, mode, recipe)
    log(f"{len(split.sources)} sources, {len(plans)} runs; held-out "
        f"{sum(split.held_counts.values())} records, evaluated "
        f"{sum(min(mode.eval_per_source, c) for c in split.held_counts.values())}")
    rows: dict[str, dict] = {}
    for plan in plans:
        log(f"[{time.time() - started_all:6.0f}s] {plan.key}: training ...")
        res = simulate(plan.key.replace("/", "-"), plan.sets, work / "runs")
        loaded = fedtune.load(res.run_dir)
        gen = [g for g in split.gen_items
               if plan.gen_sources is None or g["source"] in plan.gen_sources]
        if "base" not in rows:  # the pretrained model: this run's adapter switched off
            rows["base"] = {"label": "base model (no training)", "kind": "base",
                            **measure(loaded, split, mode, split.gen_items, base=True),
                            "epsilon": None, "delta": None, "train_s": 0.0,
                            "example_gradients": {"per_site": 0, "sites": 0, "total": 0}}
        row = {"label": plan.label, "kind": plan.key.split("/")[0],
               "source": plan.gen_sources[0] if plan.gen_sources else None,
               "epsilon_asked": (float(plan.key.rsplit("dp", 1)[1]) if "/dp" in plan.key
                                 else None),
               **measure(loaded, split, mode, gen), **spent(res.metrics),
               "train_s": res.train_s, "reused": res.reused,
               "example_gradients": example_gradients(res.run_dir),
               "checks": invariants(loaded, res.metrics)}
        rows[plan.key] = row
        log(f"[{time.time() - started_all:6.0f}s] {plan.key}: pooled loss "
            f"{row['pooled_loss']:.4f}, ε {row['epsilon']}, train {res.train_s:.0f}s, "
            f"eval {row['eval_s']:.0f}s, generate {row['gen_s']:.0f}s")
        del loaded
    base_answers = rows["base"]["answers"]
    dp8 = rows.get(f"fed/dp{SITE_DP_EPSILON:g}", {}).get("answers", [])
    examples = [{"source": item["source"], "question": item["question"],
                 "reference": item["answer"], "base": b["answer"], "fed_dp8": d["answer"]}
                for item, b, d in zip(split.gen_items, base_answers, dp8, strict=False)]
    # three examples from different sources where there are three
    picked, seen = [], set()
    for ex in examples:
        if ex["source"] not in seen:
            picked.append(ex)
            seen.add(ex["source"])
    picked = (picked + [e for e in examples if e not in picked])[:3]
    return {
        "mode": mode_name, "sources": split.sources,
        "held_out": split.held_counts, "train_records": split.train_counts,
        "eval_per_source": mode.eval_per_source, "gen_questions": mode.gen_questions,
        "gen_tokens": mode.gen_tokens, "recipe": {"provenance": RECIPE["provenance"],
                                                  "compute": mode.compute, "sets": recipe},
        "rows": rows, "examples": picked, "targets": targets(rows, split.sources),
        "wall_s": time.time() - started_all,
    }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def targets(rows: dict[str, dict], sources: list[str]) -> dict[str, Any]:
    """The issue's three targets, each with its measured numbers (None: row not run)."""
    dp8 = rows.get(f"fed/dp{SITE_DP_EPSILON:g}")
    nodp, base = rows.get("fed/nodp"), rows["base"]
    out: dict[str, Any] = {}
    if dp8 and nodp:
        gain = base["pooled_loss"] - nodp["pooled_loss"]
        ratio = (base["pooled_loss"] - dp8["pooled_loss"]) / gain if gain > 0 else None
        out["recovery"] = {"ratio": ratio, "goal": 0.5,
                           "met": ratio is not None and ratio >= 0.5}
    alone_dp = {s: rows.get(f"alone/{s}/dp{SITE_DP_EPSILON:g}") for s in sources}
    if dp8 and all(alone_dp.values()):
        per = {s: {"fed_dp8": dp8["per_source"][s], "alone_dp8": r["per_source"][s],
                   "met": dp8["per_source"][s] < r["per_source"][s]}
               for s, r in alone_dp.items() if r}
        out["beats_each_site_dp"] = {"sites": per, "met": all(p["met"] for p in per.values())}
    alone = [rows[f"alone/{s}/nodp"]["pooled_loss"] for s in sources
             if f"alone/{s}/nodp" in rows]
    if dp8 and len(alone) == len(sources):
        mean = _mean(alone)
        out["beats_mean_alone"] = {"fed_dp8": dp8["pooled_loss"], "mean_alone_nodp": mean,
                                   "met": dp8["pooled_loss"] < mean}
    return out


# --- the report --------------------------------------------------------------------------------

def _f(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def summary_rows(result: dict) -> list[dict]:
    """The main table: single rows, and the site-alone rows as means over the sites."""
    rows, sources = result["rows"], result["sources"]
    out = []

    def add(label: str, rs: list[dict]) -> None:
        if not rs:
            return
        loss = _mean([r["pooled_loss"] for r in rs])
        rouge = [r["rouge_l"] for r in rs if r["rouge_l"] is not None]
        eps = [r["epsilon"] for r in rs if r["epsilon"] is not None]
        grads = rs[0]["example_gradients"]
        out.append({"label": label, "loss": loss, "ppl": math.exp(loss),
                    "rouge_l": _mean(rouge),
                    "example_gradients": (f"{grads['total']:,}" if len(rs) == 1 else
                                          f"{len(rs)} x {grads['total']:,}"),
                    "epsilon": max(eps) if eps else None,
                    "delta": rs[0]["delta"],
                    "train_s": sum(r["train_s"] for r in rs),
                    "eval_s": sum(r["eval_s"] + r["gen_s"] for r in rs)})

    add("base model (no training)", [rows["base"]])
    add(f"each site alone, no DP (mean over {len(sources)})",
        [rows[k] for s in sources if (k := f"alone/{s}/nodp") in rows])
    add(f"each site alone, DP ε = {SITE_DP_EPSILON:g} (mean over {len(sources)})",
        [rows[k] for s in sources if (k := f"alone/{s}/dp{SITE_DP_EPSILON:g}") in rows])
    add("federated, no DP", [rows["fed/nodp"]] if "fed/nodp" in rows else [])
    for key in sorted((k for k in rows if k.startswith("fed/dp")),
                      key=lambda k: float(k[6:])):
        add(rows[key]["label"], [rows[key]])
    add("centralized, no DP", [rows["central/nodp"]] if "central/nodp" in rows else [])
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows, sources = result["rows"], result["sources"]
    fed = sorted(((r["epsilon_asked"], r["pooled_loss"]) for k, r in rows.items()
                  if k.startswith("fed/dp")))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if fed:
        ax.plot([e for e, _ in fed], [loss for _, loss in fed], "o-", label="federated, DP")
    alone_dp = [rows[k]["pooled_loss"] for s in sources
                if (k := f"alone/{s}/dp{SITE_DP_EPSILON:g}") in rows]
    if alone_dp:
        ax.plot([SITE_DP_EPSILON], [_mean(alone_dp)], "s", color="tab:red",
                label=f"each site alone, DP (mean over {len(alone_dp)})")
    lines = [("base model", rows["base"]["pooled_loss"], "black", ":")]
    if "fed/nodp" in rows:
        lines.append(("federated, no DP", rows["fed/nodp"]["pooled_loss"], "tab:blue", "--"))
    alone = [rows[k]["pooled_loss"] for s in sources if (k := f"alone/{s}/nodp") in rows]
    if alone:
        lines.append((f"each site alone, no DP (mean over {len(alone)})", _mean(alone),
                      "tab:red", "--"))
    if "central/nodp" in rows:
        lines.append(("centralized, no DP", rows["central/nodp"]["pooled_loss"], "tab:green",
                      "-."))
    for label, y, color, style in lines:
        ax.axhline(y, color=color, linestyle=style, linewidth=1, label=label)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # only the ε run
    xs = sorted({e for e, _ in fed} | ({SITE_DP_EPSILON} if alone_dp else set()))
    if xs:
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.set_xlabel("ε per site (δ as in the table)")
    ax.set_ylabel("pooled held-out answer loss")
    ax.set_title(f"MedQuAD, {len(sources)} sources ({result['mode']} mode)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _target_line(name: str, t: dict | None, text: str) -> str:
    if t is None:
        return f"- {name}: not measured in this mode (its rows were not run)."
    return f"- {name}: **{'met' if t['met'] else 'missed'}**: {text}"


def write_report(result: dict, out: Path, stem: str = "medquad") -> None:
    """<stem>.md, <stem>.json and <stem>_loss_vs_eps.png in `out`; a "## What it shows"
    section already in <stem>.md (the reading, written by hand) is kept."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    png = out / f"{stem}_loss_vs_eps.png"
    plot(result, png)
    rows, sources, tg = result["rows"], result["sources"], result["targets"]
    m = result["machine"]
    table = [
        "| row | pooled answer loss | perplexity | ROUGE-L | example-gradients | ε spent "
        "(max over sites) | δ | train (s) | eval + generate (s) |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {r['label']} | {_f(r['loss'])} | {_f(r['ppl'], '.2f')} | "
          f"{_f(r['rouge_l'], '.3f')} | {r['example_gradients']} | {_f(r['epsilon'], '.3f')} | "
          f"{_f(r['delta'], 'g')} | {_f(r['train_s'], '.0f')} | {_f(r['eval_s'], '.0f')} |"
          for r in summary_rows(result)],
    ]
    dp_key = f"dp{SITE_DP_EPSILON:g}"
    site_table = [
        f"| source | held-out (evaluated / all) | base | alone, no DP | alone, DP ε = "
        f"{SITE_DP_EPSILON:g} | federated, no DP | federated, DP ε = {SITE_DP_EPSILON:g} | "
        "federated DP beats alone DP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in sources:
        def cell(key: str, s: str = s) -> str:
            return _f(rows[key]["per_source"][s]) if key in rows else "-"

        fed8, a8 = f"fed/{dp_key}", f"alone/{s}/{dp_key}"
        beats = ("-" if fed8 not in rows or a8 not in rows else
                 "yes" if rows[fed8]["per_source"][s] < rows[a8]["per_source"][s] else "no")
        site_table.append(
            f"| {s} | {min(result['eval_per_source'], result['held_out'][s])} / "
            f"{result['held_out'][s]} | {cell('base')} | {cell(f'alone/{s}/nodp')} | "
            f"{cell(a8)} | {cell('fed/nodp')} | {cell(fed8)} | {beats} |")
    rec = tg.get("recovery")
    each = tg.get("beats_each_site_dp")
    mean = tg.get("beats_mean_alone")
    target_lines = [
        _target_line(
            f"federated DP ε = {SITE_DP_EPSILON:g} recovers ≥ 50 % of federated non-DP's loss "
            "reduction over the base model", rec,
            f"(base − fed DP) / (base − fed no DP) = {_f(rec and rec['ratio'], '.3f')}"),
        _target_line(
            f"federated DP ε = {SITE_DP_EPSILON:g} beats every site's DP-alone model on that "
            "site's held-out answers", each,
            (f"{sum(p['met'] for p in each['sites'].values())} of {len(each['sites'])} sites "
             "(per-site table)") if each else ""),
        _target_line(
            f"federated DP ε = {SITE_DP_EPSILON:g} beats the mean of the sites-alone non-DP "
            "models on the pooled held-out set", mean,
            (f"{_f(mean['fed_dp8'])} vs {_f(mean['mean_alone_nodp'])}") if mean else ""),
    ]
    examples = []
    for i, ex in enumerate(result["examples"], 1):
        examples += [f"**{i}. ({ex['source']}) {ex['question']}**", "",
                     f"- reference (first 400 characters): {ex['reference'][:400]}",
                     f"- base model: {ex['base']}",
                     f"- federated DP ε = {SITE_DP_EPSILON:g}: {ex['fed_dp8']}", ""]
    timing = ["| run | train (s) | eval (s) | generate (s) | invariant: loaded vs server "
              "(before / after; its time) |", "|---|---|---|---|---|"]
    for key, r in rows.items():
        c = r.get("checks")
        inv = (f"{abs(c['loaded_base'] - c['server_before']):.1e} / "
               f"{abs(c['loaded_final'] - c['server_after']):.1e}; {c['seconds']:.0f} s"
               if c else "-")
        timing.append(f"| {key} | {_f(r['train_s'], '.0f')}"
                      f"{' (reused)' if r.get('reused') else ''} | {r['eval_s']:.0f} | "
                      f"{r['gen_s']:.0f} | {inv} |")
    lines = [
        f"# MedQuAD: federated DP LoRA across NIH sources ({result['mode']} mode)",
        "",
        f"`{result['command']}` ({result['wall_s'] / 60:.1f} min). Every trained row is one "
        "`fedtune simulate` with fedtune's own config keys; every row is measured with "
        "`fedtune.load(run_dir)` (`.evaluate`, `.generate`). Model: the embedded "
        "SmolLM2-135M-Instruct, LoRA; sites = the `source` column "
        f"({', '.join(sources)}), all their records, a seeded {HELD_FRACTION:.0%} of each "
        f"(at least {MIN_HELD}) held out and never trained on.",
        "",
        f"Recipe chosen without site data: {result['recipe']['provenance']}",
        "",

        "Settings passed to every run: `" + " ".join(result["recipe"]["sets"]) + "`.",
        "",
        "## Pooled held-out results",
        "",
        *table,
        "",
        f"Every row: {result['recipe'].get('compute') or '-'}. "
        "Answer loss: mean cross-entropy over answer tokens (prompt not scored) of the first "
        f"{result['eval_per_source']} held-out records of each source (a seeded sample), "
        "pooled with each source's held-out record count as its weight; perplexity = "
        "exp(loss). ROUGE-L: F1 of greedy answers "
        f"({result['gen_tokens']} new tokens) to {result['gen_questions']} held-out "
        f"question(s) per source against the reference cut to {result['gen_tokens']} tokens; a "
        "site-alone model answers its own source's questions. Example-gradients: "
        "sites × rounds × local steps × expected batch, from each run's config.toml; "
        f"\"{len(result['sources'])} x N\" = {len(result['sources'])} site-alone runs of N each "
        "(their seconds are summed over those runs). "
        "ε and δ: the largest a site of that run reported (metrics.jsonl), not the requested "
        "target.",
        "",
        "## Targets",
        "",
        *target_lines,
        "",
        "## Per site: held-out answer loss on the site's own held-out records",
        "",
        *site_table,
        "",
        "## Answer loss vs ε",
        "",
        f"![pooled answer loss vs ε]({png.name})",
        "",
        "## Example answers (held-out questions, greedy)",
        "",
        *examples,
        "## Runs",
        "",
        *timing,
        "",
        "Invariant: the loaded run with its adapter switched off reproduces the server's "
        "round-0 evaluation (LoRA starts at B = 0), and with it on the server's last one, on "
        "the run's eval.jsonl.",
        "",
        f"Machine: {m['nproc']} CPU cores ({m['cpu']}), {m['memory_gib']} GiB memory, "
        f"GPU: {m['gpu'] or 'none'}; Python {m['python']}, torch {m['torch']}. Shared with "
        "other jobs: wall times vary with the load.",
    ]
    report = out / f"{stem}.md"
    notes = ""  # the reading of the table, written by hand below it, is kept
    if report.exists() and "\n## What it shows" in report.read_text():
        notes = "\n## What it shows" + report.read_text().split("\n## What it shows", 1)[1]
    report.write_text("\n".join(lines) + "\n" + notes)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true",
                       help="3 sources, tiny training (<= 10 min); writes medquad_quick.*")
    group.add_argument("--smoke", action="store_true",
                       help="CI: 2 sources, 2 runs; writes only into --out")
    group.add_argument("--ablation", action="store_true",
                       help="the full mode's federated DP ε = 8 row alone, with --set on top "
                            "(e.g. lora.r=2); writes only into --out")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a RECIPE key for every run (repeatable)")
    ap.add_argument("--out", type=Path, help=f"where the report goes (default {RESULTS})")
    ap.add_argument("--work", type=Path,
                    help="work directory (default: a temporary one); finished runs in it are "
                         "reused")
    ap.add_argument("--eval-per-source", type=int,
                    help="held-out records evaluated per source (a seeded sample; the pooled "
                         "loss weights each source by all its held-out records)")
    ap.add_argument("--gen-questions", type=int, help="held-out questions per source for ROUGE-L")
    ap.add_argument("--gen-tokens", type=int, help="new tokens per greedy answer")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="rewrite the report and plot from a saved <stem>.json (no runs)")
    a = ap.parse_args(argv)
    if a.render is not None:
        try:
            result = json.loads(a.render.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--render {a.render}: cannot read a saved result ({e})") from None
        stem = REPORT_STEM[result["mode"]]
        # The settings are what ran; how they were chosen is today's wording when they match.
        if result["recipe"]["sets"] == recipe_sets(MODES[result["mode"]], []):
            result["recipe"].update(provenance=RECIPE["provenance"],
                                    compute=MODES[result["mode"]].compute)
        write_report(result, a.out or a.render.parent, stem)
        print(f"wrote {(a.out or a.render.parent) / stem}.md from {a.render}")
        return
    mode_name = ("smoke" if a.smoke else "quick" if a.quick else
                 "ablation" if a.ablation else "full")
    if (a.smoke or a.ablation) and a.out is None and not a.no_write:
        ap.error(f"--{mode_name} writes only into --out DIR (never into results/)")
    mode = MODES[mode_name]
    overrides = {k: v for k, v in (("eval_per_source", a.eval_per_source),
                                   ("gen_questions", a.gen_questions),
                                   ("gen_tokens", a.gen_tokens)) if v is not None}
    if overrides:
        mode = replace(mode, **overrides)
    if not (DATA / "medquad.jsonl").is_file():
        raise SystemExit(f"{DATA / 'medquad.jsonl'} not found (set FEDTUNE_DATASETS)")
    command = shlex.join(["python", "benchmarks/bench_medquad.py",
                          *(argv if argv is not None else sys.argv[1:])])
    with _workdir(a.work) as work:
        result = run_benchmark(mode_name, mode, a.sets, work,
                               log=lambda s: print(s, flush=True))
    result["command"] = command
    result["machine"] = machine()
    for r in summary_rows(result):
        print(f"{r['label']:<48} loss {_f(r['loss'])}  ppl {_f(r['ppl'], '.2f')}  "
              f"ROUGE-L {_f(r['rouge_l'], '.3f')}  grads {r['example_gradients']}  "
              f"ε {_f(r['epsilon'], '.3f')}")
    for name, t in result["targets"].items():
        print(f"target {name}: {'met' if t['met'] else 'missed'}")
    if not a.no_write:
        out = a.out or RESULTS
        stem = REPORT_STEM[mode_name]
        write_report(result, out, stem)
        print(f"wrote {out / stem}.md, {stem}.json, {stem}_loss_vs_eps.png")


@contextlib.contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="fedtune-medquad-") as tmp:
        yield Path(tmp)


if __name__ == "__main__":
    main()
