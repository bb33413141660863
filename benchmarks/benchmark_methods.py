"""Utility vs privacy of the federated LoRA methods on real data.

    python -m benchmarks.benchmark_methods          # full benchmark (~45 min, 2 busy cores)
    python -m benchmarks.benchmark_methods --quick  # CI smoke run, a few minutes

Banking77 (PolyAI, CC BY 4.0), 77-intent classification with all-MiniLM-L6-v2 + LoRA, 10 banks
split by Dirichlet(alpha=0.5) label skew:
  centralized non-DP / DP (all banks' records pooled, same number of example-gradients as the
  whole federation), local-only (each bank alone, its test metrics averaged over banks), and
  federated (Flower simulation) non-DP and DP at several epsilons for FedAvg and FFA-LoRA.
MedQuAD (Ben Abacha & Demner-Fushman 2019, CC BY 4.0), SmolLM2-135M-Instruct instruction tuning,
one site per NIH `source`: held-out answer loss / perplexity of the base model, local-only,
federated non-DP and federated DP (epsilon 8).

Every run goes through the library: `simulations.runner.prepare_run` / `run_prepared` for the
federations (Flower + Ray, real DP-SGD sites with ledgers), `client.trainer.train_local` and
`common.tasks.evaluate` for the centralized and local-only baselines. The sizes below are what
two shared CPU cores allow; `results/<name>.md` states them next to the numbers.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from fedtune.common.config import RunConfig, load_config
from fedtune.common.privacy import ACCOUNTANTS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASETS = Path(os.environ.get("FEDTUNE_DATASETS", REPO.parent / "shared" / "datasets"))
MINILM = "all-minilm-l6-v2"
SMOLLM = "smollm2-135m-instruct"
# LoRA on the top two encoder layers (attention query/value); the sentence vector is the mean of
# the last hidden states, as all-MiniLM-L6-v2 was trained (task.pooling=auto, common/heads.py),
# and the linear classifier on it is trained in full (PEFT modules_to_save). Backpropagation
# stops at layer 4: a fraction of the cost of LoRA everywhere on a CPU, and fewer coordinates
# for the DP noise.
MINILM_TARGETS = [f"layer.{i}.attention.self.{m}" for i in (4, 5) for m in ("query", "value")]


@dataclass(frozen=True)
class Scale:
    """Everything that makes a benchmark big or small."""

    # Banking77
    banks: int
    rounds: int
    local_steps: int
    batch_size: int
    lr: float  # AdamW, runs without DP
    # Runs with DP have their own recipe, as in DP-SGD papers: plain SGD, larger Poisson batches
    # (the noise on the mean gradient falls as 1/batch), LoRA at step size dp_lr and the head
    # (train.head_lr) at a step size chosen per epsilon among dp_head_lrs, by the proxy of
    # benchmarks/dp_step_size.py on tune_records test queries that no reported number uses.
    # With one step size for both, SGD at a size that moves the head let the noise wreck
    # LoRA; AdamW at batch 64 and SGD at batch 256 both did worse than this recipe (figures in
    # results/benchmark_methods.md). Batch 512 is twice the compute of 256 for the same steps.
    dp_optimizer: str
    dp_lr: float
    dp_batch_size: int
    dp_head_lrs: tuple[float, ...]  # candidates; () = train.head_lr unset (dp_lr for all)
    # Accountant that calibrates the DP runs' noise (dp.accountant): "rdp" or "prv". PRV
    # (Gopi et al., NeurIPS 2021) bounds the same mechanism more tightly, so the same epsilon
    # buys less noise: at epsilon 8, q = 0.5, 48 steps, noise multiplier 2.24 instead of 2.38.
    # The report's FedAvgM row at epsilon 8 uses it with batch 1024 (the head-alone proxy at
    # epsilon 8, 8 seeds, validation: 0.851 RDP / 0.854 PRV at batch 512, 0.856 / 0.861 at
    # 1024; its command is in the report): 0.832 test accuracy, against 0.820 at RDP, 512.
    dp_accountant: str
    # A centralized run of the DP recipe with noise 0 (clipping, SGD, batch and step sizes kept;
    # not private): the DP recipe sees 8x the examples of the AdamW runs without DP, and beat
    # them (centralized at epsilon 8, batch 512: 0.870 vs 0.862), so the targets are computed
    # against the better of the two.
    noise_free_reference: bool
    # FedAvgM (server/strategy/fedavgm.py) runs at every epsilon, with DP only (its recipe is
    # the DP one's): DP-FedAvg with server momentum as in McMahan et al. (ICLR 2018), in
    # dp_momentum_rounds rounds of fewer local steps each (the same steps per bank in all:
    # rounds x local_steps), momentum dp_server_momentum, and the sites' step sizes (LoRA's and
    # the head candidates) x (1 - momentum), so that a steady delta moves the adapter as far
    # as under FedAvg. The head-alone proxy (benchmarks/dp_step_size.py) at epsilon 8, batch
    # 512, on validation queries: 0.817 for FedAvg 6 x 8, 0.832 with momentum 0.5, 0.851 for
    # momentum 0.9 in 48 rounds x 1 step (FedAvg 48 x 1: 0.825).
    dp_fedavgm: bool
    dp_server_momentum: float
    dp_momentum_rounds: int
    tune_records: int
    max_records_per_bank: int | None
    test_records: int  # stratified-random subset of test.csv used for every final number
    round_eval_records: int  # monitoring during federated runs (first N of that subset)
    epsilons: tuple[float, ...]
    methods: tuple[str, ...]
    central_dp_epsilons: tuple[float, ...]
    local_dp_epsilons: tuple[float, ...]
    # Extra FedAvg runs without DP with compressed uploads (their accuracy cost, next
    # to the fp32 run; without DP noise the difference is the encoding's alone)
    encodings: tuple[str, ...]
    # Classifier start (task.head_init), and extra FedAvg runs with a random head at these
    # epsilons to show what the label-name start is worth
    head_init: str
    random_head_epsilons: tuple[float, ...]
    # MedQuAD
    med_sites: int
    med_rounds: int
    med_local_steps: int
    med_batch_size: int
    med_lr: float
    med_max_length: int
    med_records_per_site: int
    med_eval_records: int
    med_epsilon: float


FULL = Scale(
    banks=10, rounds=6, local_steps=8, batch_size=64, lr=1e-2, dp_optimizer="sgd", dp_lr=0.05,
    dp_batch_size=512, dp_head_lrs=(0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0), dp_accountant="rdp",
    tune_records=2580,
    noise_free_reference=True, dp_fedavgm=True, dp_server_momentum=0.9, dp_momentum_rounds=48,
    max_records_per_bank=None,
    test_records=500, round_eval_records=50, epsilons=(1.0, 3.0, 8.0),
    methods=("fedavg", "ffa_lora"), central_dp_epsilons=(8.0,), local_dp_epsilons=(),
    encodings=("fp16", "int8"), head_init="auto", random_head_epsilons=(),
    med_sites=3, med_rounds=2, med_local_steps=3, med_batch_size=4, med_lr=5e-3,
    med_max_length=64, med_records_per_site=32, med_eval_records=32, med_epsilon=8.0,
)
QUICK = Scale(
    banks=10, rounds=1, local_steps=2, batch_size=8, lr=1e-2, dp_optimizer="sgd", dp_lr=0.05,
    dp_batch_size=16, dp_head_lrs=(1.0, 5.0), dp_accountant="rdp", tune_records=100,
    max_records_per_bank=40,
    noise_free_reference=True, dp_fedavgm=True, dp_server_momentum=0.9, dp_momentum_rounds=2,
    test_records=50, round_eval_records=20, epsilons=(8.0,), methods=("fedavg", "ffa_lora"),
    central_dp_epsilons=(8.0,), local_dp_epsilons=(), encodings=(), head_init="auto",
    random_head_epsilons=(),
    med_sites=2, med_rounds=1, med_local_steps=1, med_batch_size=2, med_lr=5e-3,
    med_max_length=32, med_records_per_site=8, med_eval_records=4, med_epsilon=8.0,
)


NOISE_FREE = "pooled data, DP recipe with noise 0"
MOMENTUM = "fedavgm"  # the method with DP runs only, in its own schedule (Scale.dp_fedavgm)


def _tuning_setting(setting: str, method: str) -> str:
    """The head step size's key: FedAvgM's schedule and momentum need their own."""
    return f"{setting}, {method}" if method == MOMENTUM else setting


@dataclass
class Result:
    dataset: str
    setting: str  # centralized / local-only / federated / base model
    method: str
    target_epsilon: float | None  # None: no DP
    metrics: dict[str, float]
    wall_s: float
    epsilon_spent: float | None = None  # max over sites (federated) / the one model (central)
    note: str = ""
    extra: dict = field(default_factory=dict)
    origin: str = ""  # for a row kept from an earlier report: the run that measured it


# ---------------------------------------------------------------------------- helpers


def machine() -> dict[str, str | int]:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import flwr
    import torch

    return {"cpu": cpu, "cores": os.cpu_count() or 1, "python": platform.python_version(),
            "torch": torch.__version__, "flwr": flwr.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}


class RoundBar:
    """RoundListener that advances a rich progress task by one per aggregated round."""

    def __init__(self, progress: Progress, task: int, label: str) -> None:
        self.progress, self.task, self.label = progress, task, label

    def round_started(self, server_round: int) -> None:
        self.progress.update(self.task, description=f"{self.label}: round {server_round}")

    def round_finished(self, record: dict) -> None:
        if record["round"] > 0:
            self.progress.advance(self.task)


def _stratified_subset(records: list, key: str, n: int, seed: int) -> list:
    """n records, every class represented in proportion (largest remainders), fixed seed."""
    if n >= len(records):
        return list(records)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(records))
    by_class: dict[str, list[int]] = {}
    for i in perm:
        by_class.setdefault(str(records[i].fields[key]), []).append(int(i))
    quota = {c: n * len(ix) / len(records) for c, ix in by_class.items()}
    take = {c: int(q) for c, q in quota.items()}
    rest = sorted(quota, key=lambda c: quota[c] - take[c], reverse=True)
    for c in rest[: n - sum(take.values())]:
        take[c] += 1
    chosen = sorted(i for c, ix in by_class.items() for i in ix[: take[c]])
    shuffled = rng.permutation(chosen)  # so that "first N" (round monitoring) is a fair sample
    return [records[int(i)] for i in shuffled]


# ---------------------------------------------------------------------------- runners


class Bench:
    def __init__(self, scale: Scale, work: Path, seed: int, console: Console,
                 progress: Progress, runs: int, on_result=None) -> None:
        self.s, self.work, self.seed = scale, work, seed
        self.on_result = on_result  # e.g. rewrite the report: a crash later keeps what was done
        self.console, self.progress = console, progress
        self.results: list[Result] = []
        self.overall = progress.add_task("all runs", total=runs)
        self.sub = progress.add_task("", total=1, visible=False)
        self._initial: dict[int, list[np.ndarray]] = {}
        # DP head step size per (setting, epsilon), chosen by tune_dp_step_sizes
        self.head_lr: dict[tuple[str, float], float] = {}
        self.tuning: list[dict] = []

    def _start(self, label: str, total: int) -> None:
        self.progress.reset(self.sub, total=total, description=label, visible=True)

    def _done(self, result: Result) -> None:
        self.results.append(result)
        if self.on_result is not None:
            self.on_result(self.results)
        self.progress.advance(self.overall)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
        eps = "no DP" if result.target_epsilon is None else f"ε={result.target_epsilon:g}"
        self.console.log(f"{result.dataset} | {result.setting} {result.method} ({eps}): "
                         f"{shown} [{result.wall_s:.0f} s]")

    def dp_recipe(self, setting: str, eps: float | None, method: str = "") -> dict:
        """A Banking77 DP run's optimizer (see Scale.dp_optimizer) and, for FedAvgM, its
        schedule and momentum (Scale.dp_fedavgm); kept with its row."""
        s = self.s
        recipe = {"optimizer": s.dp_optimizer, "lr": s.dp_lr, "batch_size": s.dp_batch_size,
                  "head_lr": self.head_lr.get((_tuning_setting(setting, method), eps)),
                  "accountant": s.dp_accountant}
        if method == MOMENTUM:
            recipe |= {"lr": round(s.dp_lr * (1 - s.dp_server_momentum), 12),
                       "rounds": s.dp_momentum_rounds,
                       "local_steps": s.rounds * s.local_steps // s.dp_momentum_rounds,
                       "server_momentum": s.dp_server_momentum}
        return recipe

    def dp_train(self, setting: str, eps: float | None, method: str = "") -> list[str]:
        """Config overrides of a Banking77 DP run's optimizer (and FedAvgM's schedule)."""
        r = self.dp_recipe(setting, eps, method)
        return [f"train.optimizer={r['optimizer']}", f"train.lr={r['lr']}",
                f"train.batch_size={r['batch_size']}", f"dp.accountant={r['accountant']}",
                *([f"train.head_lr={r['head_lr']}"] if r["head_lr"] is not None else []),
                *([f"federation.rounds={r['rounds']}", f"train.local_steps={r['local_steps']}",
                   f"federation.server_momentum={r['server_momentum']}"]
                  if "server_momentum" in r else [])]

    def tune_dp_step_sizes(self, cfg: RunConfig, rt, bank_files: list[Path],
                           validation_path: Path) -> None:
        """Pick the DP head step size of every DP setting on the validation queries."""
        import torch

        from benchmarks.dp_step_size import Features, choose_lr, head_of, sentence_features

        s = self.s
        settings: list[tuple[str, float | None, str]] = (
            [("federated", e, "")  # FedAvg, FFA-LoRA: one choice per epsilon for both
             for e in (*(s.epsilons if s.methods else ()), *s.random_head_epsilons)]
            + ([("federated", e, MOMENTUM) for e in s.epsilons] if s.dp_fedavgm else [])
            + [("centralized", e, "") for e in s.central_dp_epsilons]
            + ([("centralized", None, "")] if s.noise_free_reference else []))
        if not s.dp_head_lrs or not settings:
            return
        self._start("banking77: DP step sizes on validation queries", len(settings))
        self.reset(rt)
        banks = [sentence_features(rt.model, self.encode(cfg, rt, [p]), rt.pad_id)
                 for p in bank_files]
        validation = sentence_features(rt.model, self.encode(cfg, rt, [validation_path]),
                                       rt.pad_id)
        head = head_of(rt.model)
        pooled = [Features(torch.cat([b.x for b in banks]), torch.cat([b.y for b in banks]))]
        for setting, eps, method in dict.fromkeys(settings):
            federated = setting == "federated"
            schedule: dict = {"rounds": s.rounds if federated else 1,
                              "local_steps": s.local_steps * (1 if federated else len(banks))}
            keep = 1.0  # of the step sizes
            if method == MOMENTUM:
                r = self.dp_recipe(setting, eps, method)
                schedule = {k: r[k] for k in ("rounds", "local_steps", "server_momentum")}
                keep = 1 - r["server_momentum"]
            lr, scores = choose_lr(
                head, banks if federated else pooled, validation,
                candidates=[round(lr * keep, 12) for lr in s.dp_head_lrs], **schedule,
                batch_size=s.dp_batch_size, epsilon=eps, delta=cfg.dp.delta,
                clip=cfg.dp.max_grad_norm, accountant=s.dp_accountant)
            setting = _tuning_setting(setting, method)
            self.head_lr[(setting, eps)] = lr
            self.tuning.append({"setting": setting, "epsilon": eps, "head_lr": lr,
                                "batch_size": s.dp_batch_size, "accountant": s.dp_accountant,
                                "validation_accuracy": scores})
            self.progress.advance(self.sub)
            shown = ", ".join(f"{k:g}: {v:.3f}" for k, v in scores.items())
            shown_eps = "recipe with noise 0" if eps is None else f"ε={eps:g}"
            self.console.log(f"banking77: {setting} DP {shown_eps}: head lr {lr:g} "
                             f"(validation accuracy by lr: {shown})")

    # -- model-side helpers (in this process)

    def runtime(self, cfg: RunConfig):
        from fedtune.common.model_cache import get_runtime
        from fedtune.common.tasks import num_labels, resolve_task

        task = resolve_task(cfg)
        return get_runtime(cfg, task, num_labels(cfg, task))

    def reset(self, rt) -> None:
        """Put the adapter back to the one this process started from (same for every run)."""
        from fedtune.common.lora import get_adapter, set_adapter

        key = id(rt)
        if key not in self._initial:
            self._initial[key] = get_adapter(rt.model)
        set_adapter(rt.model, self._initial[key])

    def encode(self, cfg: RunConfig, rt, paths: list[Path]):
        from fedtune.common.data import read_records
        from fedtune.common.tasks import encode_records

        records = [r for p in paths for r in read_records(p)]
        return encode_records(records, rt.tokenizer, cfg, rt.task, cfg.data.labels)

    def evaluate(self, rt, data) -> dict[str, float]:
        from fedtune.common.tasks import evaluate

        return evaluate(rt.model, data, rt.task, rt.pad_id, rt.device, batch_size=32)

    def train_alone(self, cfg: RunConfig, rt, data, steps: int, eps: float | None,
                    seed: int, setting: str, noise_free: bool = False) -> float | None:
        """One model on one dataset (a bank alone, or everything pooled): DP-SGD or plain;
        `noise_free`: the DP recipe with noise 0 (not private)."""
        from fedtune.client.trainer import poisson_sample_rate, train_local
        from fedtune.common.privacy import calibrate_noise, check_delta, epsilon

        self.reset(rt)
        sigma, spent = 0.0, None
        dp_recipe = eps is not None or noise_free
        recipe_cfg = _with(cfg, *self.dp_train(setting, eps)) if dp_recipe else cfg
        dp = recipe_cfg.dp.model_copy(update={"enabled": dp_recipe, "target_epsilon": eps})
        train = recipe_cfg.train
        if eps is not None:
            check_delta(dp.delta, len(data))
            q = poisson_sample_rate(len(data), train.batch_size)
            sigma = calibrate_noise(eps, dp.delta, q, steps, dp.accountant)
            spent = epsilon([(sigma, q, steps)], dp.delta, dp.accountant)
        train_local(rt.model, data, task=rt.task, pad_id=rt.pad_id, device=rt.device,
                    train=train, dp=dp, noise_multiplier=sigma, steps=steps, seed=seed)
        return spent

    # -- the three kinds of run

    def federated(self, cfg: RunConfig, name: str, dataset: str, method: str,
                  eps: float | None, final_eval=None, encoding: str = "fp32",
                  variant: str = "", overrides: tuple[str, ...] = ()) -> Result:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from fedtune.simulations.runner import prepare_run, run_prepared

        cfg = _with(cfg, f"output.run_name={name}", f"federation.strategy={method}",
                    f"federation.update_encoding={encoding}",
                    *(["dp.enabled=false"] if eps is None else
                      ["dp.enabled=true", f"dp.target_epsilon={eps}",
                       *(self.dp_train("federated", eps, method)
                         if dataset == "banking77" else [])]),
                   *overrides)
        shown = method if encoding == "fp32" else f"{method}, {encoding} upload"
        shown += f", {variant}" if variant else ""
        label = f"{dataset}: federated {shown} " + ("no DP" if eps is None else f"ε={eps:g}")
        self._start(label, cfg.federation.rounds)
        t0 = time.time()
        prepared = prepare_run(cfg)
        # The ServerApp runs in this process and takes its initial adapter from the cached
        # runtime, which earlier runs trained or loaded: start every run from the same init.
        self.reset(self.runtime(prepared.cfg))
        records = run_prepared(prepared, listener=RoundBar(self.progress, self.sub, label))
        if not records or records[-1]["round"] != cfg.federation.rounds:
            raise RuntimeError(f"{label}: the run stopped early; see {prepared.run_dir}")
        last = records[-1]
        metrics = dict(last["eval"])
        if final_eval is not None:  # the final global adapter on the full test subset
            rt = self.runtime(prepared.cfg)
            missing = set_peft_model_state_dict(
                rt.model, load_file(str(prepared.run_dir / "adapter" / "adapter_model.safetensors"))
            )
            if missing.unexpected_keys:
                raise RuntimeError(f"adapter does not fit the model: {missing.unexpected_keys}")
            metrics = self.evaluate(rt, final_eval)
        eps_spent = [s["epsilon"] for m in records[1:] for s in m["sites"] if "epsilon" in s]
        # the same run by both accountants (the ledgers record both, whichever one enforced)
        by_accountant = {a: max(spent) for a in ACCOUNTANTS if (spent := [
            s[f"epsilon_{a}"] for m in records[1:] for s in m["sites"] if f"epsilon_{a}" in s])}
        upload = [m["aggregation"]["upload_bytes"] for m in records[1:]
                  if "upload_bytes" in m.get("aggregation", {})]
        recipe = ({"dp_recipe": self.dp_recipe("federated", eps, method)}
                  if eps is not None and dataset == "banking77" else {})
        result = Result(dataset, "federated", shown, eps, metrics, time.time() - t0,
                        max(eps_spent) if eps_spent else None,
                        extra={**recipe, **({"epsilon_by_accountant": by_accountant}
                                            if by_accountant else {}),
                               "run_dir": str(prepared.run_dir), "encoding": encoding,
                               "upload_bytes_per_round": upload,
                               "rounds": [{"round": m["round"], **m["eval"]} for m in records
                                          if "eval" in m]})
        self._done(result)
        return result

    # ------------------------------------------------------------------------ Banking77

    def banking77(self, root: Path, dp_only: bool = False) -> None:
        """Every Banking77 row; with `dp_only` only the rows with DP (the others are kept)."""
        from fedtune.common.data import read_records, write_jsonl
        from fedtune.simulations.runner import prepare_run

        s = self.s
        test = read_records(root / "test.csv")
        subset = _stratified_subset(test, "category", s.test_records, self.seed)
        eval_path = self.work / "banking77_test_subset.jsonl"
        write_jsonl(eval_path, [r.fields for r in subset])
        # Validation queries for the DP step sizes: test.csv queries outside that subset
        reported = {r.line for r in subset}
        rest = [r for r in test if r.line not in reported]
        validation_path = self.work / "banking77_validation.jsonl"
        write_jsonl(validation_path, [r.fields for r in _stratified_subset(
            rest, "category", min(s.tune_records, len(rest)), self.seed)])
        cfg = load_config(None, [
            f"model.name={MINILM}", "task.kind=classification", "model.max_length=24",
            "lora.r=4", "lora.alpha=8", f"lora.target_modules={json.dumps(MINILM_TARGETS)}",
            f"data.train={root / 'train.csv'}", f"data.eval={eval_path}",
            f"data.max_eval_records={s.round_eval_records}", "data.text_column=text",
            "data.label_column=category", "data.partition=dirichlet", "data.dirichlet_alpha=0.5",
            f"data.seed={self.seed}", f"seed={self.seed}", f"federation.num_sites={s.banks}",
            f"federation.rounds={s.rounds}", f"train.local_steps={s.local_steps}",
            f"train.batch_size={s.batch_size}", f"train.lr={s.lr}", "train.optimizer=adamw",
            "dp.delta=1e-5", "dp.max_grad_norm=1.0", "federation.parallel_sites=0",
            f"task.head_init={s.head_init}", f"output.dir={self.work / 'banking77'}",
            *([f"data.max_records_per_site={s.max_records_per_bank}"]
              if s.max_records_per_bank else []),
        ])
        # The banks (same split as every federated run below: same data seed).
        part = prepare_run(_with(cfg, "output.run_name=partition", "dp.enabled=false"))
        cfg = part.cfg  # with the 77 labels filled in
        rt = self.runtime(cfg)
        test_data = self.encode(cfg, rt, [eval_path])
        bank_files = [site.data_path for site in part.sites]
        sizes = [sum(1 for _ in open(p, encoding="utf-8")) for p in bank_files]
        self.console.log(f"Banking77: {len(bank_files)} banks, records {sizes}; test subset "
                         f"{len(test_data)} of {len(test)}")
        steps = s.rounds * s.local_steps  # per bank; the federation does banks x steps
        no_dp: tuple[float | None, ...] = () if dp_only else (None,)
        if not dp_only:
            t0 = time.time()
            self.reset(rt)
            from fedtune.common.heads import starts_from_label_names

            head = ("label-name head (zero-shot)"
                    if starts_from_label_names(cfg.task.head_init, cfg.data.labels)
                    else "random head")
            self._done(Result("banking77", "base model", f"untrained LoRA + {head}", None,
                              self.evaluate(rt, test_data), time.time() - t0))

        self.tune_dp_step_sizes(cfg, rt, bank_files, validation_path)
        pooled = self.encode(cfg, rt, bank_files)
        for eps in (*no_dp, *s.central_dp_epsilons):
            label = "centralized " + ("no DP" if eps is None else f"DP ε={eps:g}")
            self._start(f"banking77: {label}", 1)
            t0 = time.time()
            spent = self.train_alone(cfg, rt, pooled, steps * len(bank_files), eps, self.seed,
                                     "centralized")
            self.progress.advance(self.sub)
            self._done(Result("banking77", "centralized", "pooled data", eps,
                              self.evaluate(rt, test_data), time.time() - t0, spent,
                              note=f"{steps * len(bank_files)} steps",
                              extra={} if eps is None else {
                                  "dp_recipe": self.dp_recipe("centralized", eps)}))
        if s.noise_free_reference:
            self._start("banking77: centralized, DP recipe with noise 0", 1)
            t0 = time.time()
            self.train_alone(cfg, rt, pooled, steps * len(bank_files), None, self.seed,
                             "centralized", noise_free=True)
            self.progress.advance(self.sub)
            self._done(Result("banking77", "centralized", NOISE_FREE, None,
                              self.evaluate(rt, test_data), time.time() - t0,
                              note=f"{steps * len(bank_files)} steps; clipping, no noise",
                              extra={"dp_recipe": self.dp_recipe("centralized", None)}))

        for eps in (*no_dp, *s.local_dp_epsilons):
            label = "local-only " + ("no DP" if eps is None else f"DP ε={eps:g}")
            self._start(f"banking77: {label}", len(bank_files))
            t0 = time.time()
            per_bank, spent = [], []
            for k, path in enumerate(bank_files):
                data = self.encode(cfg, rt, [path])
                e = self.train_alone(cfg, rt, data, steps, eps, self.seed + k, "local-only")
                per_bank.append(self.evaluate(rt, test_data))
                spent.append(e)
                self.progress.advance(self.sub)
            mean = {k: float(np.mean([m[k] for m in per_bank])) for k in per_bank[0]}
            self._done(Result("banking77", "local-only", "each bank alone (mean)", eps, mean,
                              time.time() - t0, max(spent) if eps is not None else None,
                              note=f"{steps} steps per bank; best bank accuracy "
                                   f"{max(m['accuracy'] for m in per_bank):.4f}",
                              extra={"per_bank": per_bank, **({} if eps is None else {
                                  "dp_recipe": self.dp_recipe("local-only", eps)})}))

        for method in s.methods:
            for eps in (*no_dp, *s.epsilons):
                tag = "nodp" if eps is None else f"eps{eps:g}"
                self.federated(cfg, f"{method}-{tag}", "banking77", method, eps, test_data)
        for eps in s.epsilons if s.dp_fedavgm else ():
            self.federated(cfg, f"{MOMENTUM}-eps{eps:g}", "banking77", MOMENTUM, eps, test_data)
        for enc in () if dp_only else s.encodings:
            self.federated(cfg, f"fedavg-nodp-{enc}", "banking77", "fedavg", None, test_data,
                           encoding=enc)
        for eps in s.random_head_epsilons:
            self.federated(cfg, f"fedavg-eps{eps:g}-random-head", "banking77", "fedavg", eps,
                           test_data, variant="random head",
                           overrides=("task.head_init=random",))

    # ------------------------------------------------------------------------ MedQuAD

    def medquad(self, path: Path) -> None:
        from collections import Counter

        from fedtune.common.data import read_records, write_jsonl

        s = self.s
        records = read_records(path)
        counts = Counter(str(r.fields["source"]) for r in records)
        sources = [g for g, _ in sorted(counts.items(), key=lambda x: (-x[1], x[0]))][: s.med_sites]
        rng = np.random.default_rng(self.seed)
        chosen = [r for r in records if r.fields["source"] in sources]
        perm = rng.permutation(len(chosen))
        held = [chosen[i] for i in perm[: s.med_eval_records]]
        # Each site keeps a random med_records_per_site of its own records (prepare_run caps).
        train = [chosen[i] for i in sorted(perm[s.med_eval_records:])]
        train_path, eval_path = self.work / "medquad_train.jsonl", self.work / "medquad_eval.jsonl"
        write_jsonl(train_path, [r.fields for r in train])
        write_jsonl(eval_path, [r.fields for r in held])
        cfg = load_config(None, [
            f"model.name={SMOLLM}", "task.kind=causal_lm", f"model.max_length={s.med_max_length}",
            "lora.r=8", "lora.alpha=16", f"data.train={train_path}", f"data.eval={eval_path}",
            f"data.max_eval_records={s.med_eval_records}", "data.input_key=question",
            "data.output_key=answer", "data.partition=column", "data.partition_column=source",
            f"data.max_records_per_site={s.med_records_per_site}", f"data.seed={self.seed}",
            f"seed={self.seed}", f"federation.num_sites={s.med_sites}",
            f"federation.rounds={s.med_rounds}", f"train.local_steps={s.med_local_steps}",
            f"train.batch_size={s.med_batch_size}", f"train.lr={s.med_lr}", "dp.delta=1e-5",
            "federation.parallel_sites=0", f"output.dir={self.work / 'medquad'}",
        ])
        from fedtune.simulations.runner import prepare_run

        part = prepare_run(_with(cfg, "output.run_name=partition", "dp.enabled=false"))
        rt = self.runtime(cfg)
        eval_data = self.encode(cfg, rt, [eval_path])
        self.console.log(f"MedQuAD: sites {part.groups}, {s.med_records_per_site} records each, "
                         f"held-out {len(eval_data)} answers")
        t0 = time.time()
        self.reset(rt)
        self._done(Result("medquad", "base model", SMOLLM, None, self.evaluate(rt, eval_data),
                          time.time() - t0))
        steps = s.med_rounds * s.med_local_steps
        self._start("medquad: local-only", len(part.sites))
        t0 = time.time()
        per_site = []
        for k, site in enumerate(part.sites):
            self.train_alone(cfg, rt, self.encode(cfg, rt, [site.data_path]), steps, None,
                             self.seed + k)
            per_site.append(self.evaluate(rt, eval_data))
            self.progress.advance(self.sub)
        mean_loss = float(np.mean([m["loss"] for m in per_site]))
        self._done(Result("medquad", "local-only", "each site alone (mean)", None,
                          {"loss": mean_loss,
                           "perplexity": float(np.mean([m["perplexity"] for m in per_site]))},
                          time.time() - t0, extra={"per_site": per_site}))
        self.federated(cfg, "fedavg-nodp", "medquad", "fedavg", None)
        self.federated(cfg, f"fedavg-eps{s.med_epsilon:g}", "medquad", "fedavg", s.med_epsilon)


def _override(scale: Scale, items: list[str]) -> Scale:
    """Scale with `field=value` overrides (tuples as comma lists, "none" for None)."""
    updates: dict[str, object] = {}
    for item in items:
        key, _, raw = item.partition("=")
        if key not in Scale.__dataclass_fields__:
            raise typer.BadParameter(f"--scale {item}: unknown field; one of "
                                     f"{', '.join(Scale.__dataclass_fields__)}")
        current = getattr(scale, key)
        if isinstance(current, tuple):
            value: object = tuple(x for x in raw.split(",") if x)
            if key not in ("methods", "encodings"):
                value = tuple(float(x) for x in value)  # type: ignore[union-attr]
        elif raw.lower() == "none":
            value = None
        elif isinstance(current, bool):
            value = raw.lower() in ("1", "true", "yes", "on")
        elif isinstance(current, float):
            value = float(raw)
        else:
            value = raw if key in ("dp_optimizer", "dp_accountant", "head_init") else int(raw)
        updates[key] = value
    return replace(scale, **updates)


def _with(cfg: RunConfig, *overrides: str) -> RunConfig:
    from fedtune.common.config import apply_overrides

    data = cfg.model_dump(mode="json", exclude_none=True)
    return RunConfig.model_validate(apply_overrides(data, list(overrides)))


# ---------------------------------------------------------------------------- report


def _eps(e: float | None) -> str:
    return "no DP" if e is None else f"{e:g}"


def _tuned_eps(e: float | None) -> str:
    return "noise 0" if e is None else f"{e:g}"


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _reference(bank: list[Result]) -> Result | None:
    """What the federated runs are held to: the better centralized run without DP (the AdamW
    recipe or the DP one with noise 0)."""
    return max((r for r in bank if r.setting == "centralized" and r.target_epsilon is None),
               key=lambda r: r.metrics["accuracy"], default=None)


def checks(results: list[Result]) -> list[str]:
    """The issue's targets, computed from the measured numbers."""
    bank = [r for r in results if r.dataset == "banking77"]
    central = _reference(bank)
    local = next((r for r in bank if r.setting == "local-only" and r.target_epsilon is None), None)
    lines = []
    for r in bank:
        if r.setting != "federated" or central is None:
            continue
        ratio = r.metrics["accuracy"] / central.metrics["accuracy"]
        eps = "no DP" if r.target_epsilon is None else f"ε={r.target_epsilon:g}"
        verdict = "meets" if ratio >= 0.9 else "misses"
        line = (f"- {r.method} {eps}: accuracy {r.metrics['accuracy']:.4f} = {ratio:.1%} of "
                f"centralized non-DP ({central.metrics['accuracy']:.4f}"
                + (", the DP recipe with noise 0)" if central.method == NOISE_FREE else ")"))
        if r.target_epsilon == 8.0:
            line += f" — {verdict} the ≥ 90% target"
        if local is not None:
            better = r.metrics["accuracy"] > local.metrics["accuracy"]
            line += (f"; {'beats' if better else 'does not beat'} local-only non-DP "
                     f"({local.metrics['accuracy']:.4f})")
        lines.append(line)
    for r in bank:  # compressed uploads vs the fp32 run of the same method and epsilon
        enc = r.extra.get("encoding", "fp32")
        if r.setting != "federated" or enc == "fp32" or "random head" in r.method:
            continue
        base = next((b for b in bank if b.setting == "federated" and b.target_epsilon ==
                     r.target_epsilon and b.method == r.method.split(",")[0]), None)
        up, up0 = r.extra.get("upload_bytes_per_round"), (base.extra.get(
            "upload_bytes_per_round") if base else None)
        if base is None or not up or not up0:
            continue
        ratio = float(np.mean(up)) / float(np.mean(up0))
        # rounded: 0.854 - 0.844 is 1.0000000000000009 points in floating point
        drop = round(100 * (base.metrics["accuracy"] - r.metrics["accuracy"]), 6)
        ok = ratio <= 0.25 and drop <= 1.0
        lines.append(f"- {r.method} ({_eps(r.target_epsilon)}): upload {ratio:.3f}x fp32's, "
                     f"accuracy {r.metrics['accuracy']:.4f} vs {base.metrics['accuracy']:.4f} "
                     f"({-drop:+.1f} points) — {'meets' if ok else 'misses'} the ≤ 0.25x, "
                     "≤ 1 point target")
    med = {(r.setting, r.target_epsilon): r for r in results if r.dataset == "medquad"}
    loc = med.get(("local-only", None))
    for key in (("federated", None), ("federated", 8.0)):
        if key in med and loc is not None:
            fed = med[key]
            eps = "no DP" if key[1] is None else f"ε={key[1]:g}"
            word = "lower" if fed.metrics["loss"] < loc.metrics["loss"] else "not lower"
            lines.append(f"- MedQuAD federated {eps}: held-out answer loss "
                         f"{fed.metrics['loss']:.4f}, {word} than local-only "
                         f"({loc.metrics['loss']:.4f})")
    return lines


def _kept_results(path: Path, only: str, dp_only: bool = False
                  ) -> tuple[list[Result], list[dict]]:
    """The rows of the previous report that this run may not measure again (the other dataset
    with --only; with --dp-only every row: the DP rows this run measures replace theirs, see
    `_merged`), each naming the run that measured it, and that report's DP step-size choices."""
    if (only == "all" and not dp_only) or not path.exists():
        return [], []
    old = json.loads(path.read_text())
    that_run = f"`{old['command']}` ({old.get('date', 'earlier')}, {old['wall_s'] / 60:.1f} min)"
    old_scale = old.get("scale", {})
    tuning = [{"batch_size": old_scale.get("dp_batch_size"), **t,  # JSON keys are strings
               "validation_accuracy": {float(lr): a for lr, a in t["validation_accuracy"].items()}}
              for t in old.get("dp_step_sizes", [])]
    kept: list[Result] = []
    for row in old["results"]:
        r = Result(**row)
        if only in ("all", r.dataset) and not dp_only:
            continue  # this run measures it again
        if not r.origin:  # measured by that run, or, in a report from before rows carried
            # their origin, kept by it: then its one kept_from named where from
            legacy = ("origin" not in row and old.get("kept_from")
                      and f"--only {r.dataset}" not in old["command"])
            if (not legacy and r.dataset == "banking77" and r.target_epsilon is not None
                    and "dp_recipe" not in r.extra and "dp_optimizer" in old_scale):
                # DP recipe of a report from before rows carried theirs: that run's scale
                head = next((t["head_lr"] for t in tuning if t["epsilon"] == r.target_epsilon
                             and t["setting"] == r.setting), None)
                r.extra = {**r.extra, "dp_recipe": {
                    "optimizer": old_scale["dp_optimizer"], "lr": old_scale["dp_lr"],
                    "batch_size": old_scale["dp_batch_size"], "head_lr": head}}
            r = replace(r, origin=old["kept_from"] if legacy else that_run)
        kept.append(r)
    return kept, tuning


def _key(r: Result) -> tuple:
    return r.dataset, r.setting, r.method, r.target_epsilon


def _merged(kept: list[Result], new: list[Result]) -> list[Result]:
    """The kept rows, each that this run measured again replaced in place, then the new ones."""
    fresh = {_key(r): r for r in new}
    rows = [fresh.pop(_key(r), r) for r in kept]
    return rows + [r for r in new if _key(r) in fresh]


def _accountant(d: dict) -> str:
    """The accountant of a DP recipe or step-size choice (RDP in reports from before the field)."""
    return d.get("accountant", "rdp")


def _merged_tuning(kept: list[dict], new: list[dict], rows: list[Result]) -> list[dict]:
    """The step-size choices behind the report's DP rows: the kept ones that this run did not
    make again (by setting, ε, DP batch and accountant: a kept row of another batch or
    accountant keeps its own), then the new ones."""
    def key(t: dict) -> tuple:
        return t["setting"], t["epsilon"], t.get("batch_size"), _accountant(t)

    used = {(_tuning_setting(r.setting, r.method), r.target_epsilon, recipe["batch_size"],
             _accountant(recipe)) for r in rows if (recipe := r.extra.get("dp_recipe"))}
    chosen = {key(t) for t in new}
    return [t for t in (*[t for t in kept if key(t) not in chosen], *new) if key(t) in used]


def _origins(rows: list[Result]) -> str:
    """Which earlier runs measured the rows that carry an origin, with their counts."""
    groups: dict[str, list[Result]] = {}
    for r in rows:
        if r.origin:
            groups.setdefault(r.origin, []).append(r)
    return "; ".join(
        f"{len(group)} {'/'.join(dict.fromkeys(r.dataset for r in group))} row"
        f"{'s' if len(group) > 1 else ''} from {origin}" for origin, group in groups.items())


def write_report(out: Path, name: str, results: list[Result], scale: Scale, seed: int,
                 wall: float, info: dict, command: str, quick: bool,
                 kept_from: str = "", tuning: list[dict] | None = None
                 ) -> tuple[Path, Path | None]:
    out.mkdir(parents=True, exist_ok=True)
    tuning = tuning or []
    (out / f"{name}.json").write_text(json.dumps({
        "command": command, "seed": seed, "machine": info, "wall_s": wall, "quick": quick,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "kept_from": kept_from,
        "scale": asdict(scale), "dp_step_sizes": tuning,
        "results": [asdict(r) for r in results]}, indent=1))
    plot = plot_banking77(results, out / f"{name}_banking77.png")
    lines = [
        f"# fedtune benchmark: federated LoRA methods vs privacy{' (quick mode)' if quick else ''}",
        "",
        f"- command: `{command}`",
        f"- seed: {seed}",
        f"- machine: {info['cpu']}, {info['cores']} cores (shared with other jobs), GPU "
        f"{info['gpu']}; Python {info['python']}, torch {info['torch']}, Flower {info['flwr']}",
        f"- wall time: {wall / 60:.1f} min in all; per run in the tables",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        *([f"- rows not re-run here (--only, --dp-only) are kept from earlier runs: {kept_from}"]
          if kept_from else []),
        "",
        "## Banking77: 77-intent classification, all-MiniLM-L6-v2 + LoRA",
        "",
        f"{scale.banks} banks by Dirichlet(α=0.5) label skew over train.csv"
        + (f" (at most {scale.max_records_per_bank} records a bank)"
           if scale.max_records_per_bank else " (all 10,003 records)")
        + f"; test: a stratified random {scale.test_records} of the 3,080 test.csv queries, the "
        f"same for every row. Queries cut to 24 tokens. LoRA r=4 (α=8) on query/value of "
        f"encoder layers 4-5, mean-pooled unit sentence vector, linear "
        f"classifier (task.head_init={scale.head_init}: started from the label names, a "
        f"zero-shot head, unless a row says random head) trained. Without DP: AdamW lr "
        f"{scale.lr}, batch {scale.batch_size}; with DP: {scale.dp_optimizer}, LoRA lr "
        f"{scale.dp_lr}, Poisson batches of the expected size in the 'DP batch' column (this "
        f"run's: {scale.dp_batch_size}), head lr per ε chosen on validation queries (below); "
        f"{scale.rounds} rounds x {scale.local_steps} local steps"
        + (f" (fedavgm, DP only: {scale.dp_momentum_rounds} rounds x "
           f"{scale.rounds * scale.local_steps // scale.dp_momentum_rounds}, server momentum "
           f"{scale.dp_server_momentum:g}, LoRA lr and head lr candidates x "
           f"{1 - scale.dp_server_momentum:.2g}, as in the column)" if scale.dp_fedavgm else "")
        + ". "
        "Centralized = the banks' records pooled, trained for banks x rounds x local steps "
        "steps (the federation's example-gradients); local-only = each bank alone for rounds x "
        "local steps, its accuracy on the shared test set averaged over banks. DP: "
        "sample-level (ε, δ=1e-5) per site, RDP accountant (PRV where the column says so: "
        "Gopi et al. 2021, a tighter bound of the same mechanism), clipping norm 1, noise "
        "calibrated to the whole run; 'ε spent' is what the ledgers recorded (max over sites; "
        "for a PRV row also by RDP).",
        "",
        "| setting | method | target ε | ε spent | DP batch, head lr | accuracy | macro-F1 | loss "
        "| upload KB/round | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.dataset != "banking77":
            continue
        upload = r.extra.get("upload_bytes_per_round")
        recipe = r.extra.get("dp_recipe")
        accountant = _accountant(recipe) if recipe else "rdp"
        shown = "-" if not recipe else f"{recipe['batch_size']}, " + (
            "-" if recipe["head_lr"] is None else f"{recipe['head_lr']:g}") + (
            f"; {recipe['rounds']} x {recipe['local_steps']}, momentum "
            f"{recipe['server_momentum']:g}" if "server_momentum" in recipe else "") + (
            f"; {accountant.upper()}" if accountant != "rdp" else "")
        spent = _fmt(r.epsilon_spent, 2)
        if accountant != "rdp" and (
                rdp := r.extra.get("epsilon_by_accountant", {}).get("rdp")) is not None:
            spent += f" (RDP: {rdp:.2f})"  # what the same noise costs by the looser bound
        lines.append(
            f"| {r.setting} | {r.method} | {_eps(r.target_epsilon)}"
            f" | {spent} | {shown} | {_fmt(r.metrics.get('accuracy'))} | "
            f"{_fmt(r.metrics.get('macro_f1'))} | {_fmt(r.metrics.get('loss'))} | "
            f"{_fmt(float(np.mean(upload)) / 1e3, 1) if upload else '-'} | {r.wall_s:.0f} |"
        )
    if plot:
        lines += ["", f"![accuracy vs epsilon]({plot.name})"]
    if tuning:
        lrs = sorted({lr for t in tuning for lr in t["validation_accuracy"]})
        lines += [
            "", "### DP step size of the head, chosen per ε on validation queries", "",
            f"{scale.tune_records} test.csv queries outside the reported subset; proxy runs of "
            "the head alone on frozen sentence vectors of the banks' records, mean of 3 seeds "
            "(benchmarks/dp_step_size.py; the tuning itself is not in the sites' ε). "
            "Validation accuracy by head lr:", "",
            "| setting | ε | DP batch | chosen | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
            "|---|---|---|---|" + "---|" * len(lrs),
            *(f"| {t['setting']} | {_tuned_eps(t['epsilon'])} | {t.get('batch_size') or '-'}"
              + ("" if _accountant(t) == "rdp" else f", {_accountant(t).upper()}")
              + " | "
              f"{t['head_lr']:g} | " + " | ".join(
                _fmt(t["validation_accuracy"].get(lr), 3) for lr in lrs) + " |"
              for t in tuning),
        ]
    lines += [
        "", "## MedQuAD: instruction tuning, SmolLM2-135M-Instruct + LoRA", "",
        f"Sites = the {scale.med_sites} largest NIH `source`s, {scale.med_records_per_site} "
        f"random records each; held-out: {scale.med_eval_records} random answers of those "
        f"sources (never trained on); prompt+answer cut to {scale.med_max_length} tokens (the "
        f"answer keeps at least half); LoRA r=8 on q/v (PEFT default); AdamW lr {scale.med_lr}, "
        f"batch {scale.med_batch_size}, {scale.med_rounds} rounds x {scale.med_local_steps} "
        f"local steps; loss = mean token cross-entropy on the answer tokens only.",
        "",
        "| setting | method | target ε | ε spent | answer loss | perplexity | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.dataset != "medquad":
            continue
        lines.append(
            f"| {r.setting} | {r.method} | {_eps(r.target_epsilon)}"
            f" | {_fmt(r.epsilon_spent, 2)} | {_fmt(r.metrics.get('loss'))} | "
            f"{_fmt(r.metrics.get('perplexity'), 2)} | {r.wall_s:.0f} |"
        )
    lines += ["", "## Targets (computed from the numbers above)", "", *checks(results), "",
              "## What was cut for two CPU cores", "",
              "- Banking77: one seed; " + (f"{scale.rounds} rounds x {scale.local_steps} local "
              "steps (about "
              f"{scale.rounds * scale.local_steps * scale.batch_size / 1000:.1f}k examples per "
              "bank); LoRA on the top two layers only; a test subset, not all 3,080; no "
              "local-only DP row (local-only non-DP is the stronger baseline)."),
              f"- MedQuAD: {scale.med_sites} of nine sources, {scale.med_records_per_site} records "
              f"each, {scale.med_max_length}-token windows, a few "
              "optimizer steps: the numbers show the direction, not converged quality.",
              ""]
    md = out / f"{name}.md"
    md.write_text("\n".join(lines))
    return md, plot


def plot_banking77(results: list[Result], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bank = [r for r in results if r.dataset == "banking77"]
    fed = [r for r in bank if r.setting == "federated"]
    if not fed:
        return None
    dp_eps = sorted({r.target_epsilon for r in bank if r.target_epsilon is not None})
    inf_x = (max(dp_eps) * 3) if dp_eps else 1.0  # where "no DP" sits on the axis
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    # Fixed colours: purple, gray, black and green belong to the reference lines below.
    colors = {"fedavg": "tab:blue", "ffa_lora": "tab:red", MOMENTUM: "tab:brown",
              "fedavg, fp16 upload": "tab:orange", "fedavg, int8 upload": "tab:olive"}
    spare = iter(["tab:cyan", "tab:pink", "gold", "navy", "teal"])
    for method in sorted({r.method for r in fed}):
        rows = sorted((r for r in fed if r.method == method),
                      key=lambda r: math.inf if r.target_epsilon is None else r.target_epsilon)
        xs = [inf_x if r.target_epsilon is None else r.target_epsilon for r in rows]
        ax.plot(xs, [r.metrics["accuracy"] for r in rows], marker="o",
                color=colors.get(method) or next(spare, None), label=f"federated {method}")
    styles = {("centralized", None): ("k", "--"), ("local-only", None): ("tab:purple", ":"),
              ("base model", None): ("tab:gray", "-.")}
    for r in bank:
        key = (r.setting, r.target_epsilon)
        if r.method == NOISE_FREE:
            ax.axhline(r.metrics["accuracy"], color="tab:gray", ls="--",
                       label="centralized, DP recipe with noise 0")
        elif key in styles:
            color, ls = styles[key]
            name = "untrained (start)" if r.setting == "base model" else f"{r.setting}, no DP"
            ax.axhline(r.metrics["accuracy"], color=color, ls=ls, label=name)
        elif r.setting in ("centralized", "local-only") and r.target_epsilon is not None:
            ax.plot([r.target_epsilon], [r.metrics["accuracy"]], marker="s", ls="none",
                    color="k" if r.setting == "centralized" else "tab:purple",
                    label=f"{r.setting}, DP ε={r.target_epsilon:g}")
    reference = _reference(bank)
    if reference is not None:
        ax.axhline(0.9 * reference.metrics["accuracy"], color="tab:green", ls=(0, (1, 3)),
                   label="target: 90% of centralized no DP")
    ax.set_xscale("log")
    ticks = [*dp_eps, inf_x]
    ax.set_xticks(ticks, [f"{e:g}" for e in dp_eps] + ["no DP"])
    ax.minorticks_off()
    ax.set_xlabel("ε per site (δ = 1e-5)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Banking77, 10 banks (Dirichlet α=0.5), MiniLM + LoRA")
    ax.grid(alpha=0.3)
    # Outside the axes: points can sit anywhere between 0 and 1.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- CLI


def main(
    quick: bool = typer.Option(False, "--quick", help="A few minutes: CI smoke settings."),
    datasets: Path = typer.Option(DEFAULT_DATASETS, help="Folder with banking77/ and medquad/."),
    out: Path = typer.Option(None, help="Results folder (default results/, or results/quick)."),
    work: Path = typer.Option(None, help="Run directories (default runs/benchmark-<time>)."),
    seed: int = typer.Option(0, help="Data split, sampling and training seed."),
    only: str = typer.Option("all", help="all, banking77 or medquad."),
    dp_only: bool = typer.Option(
        False, "--dp-only", help="Re-run only Banking77's DP rows of this scale (implies --only "
        "banking77; e.g. --scale epsilons=8 for the epsilon-8 rows alone); the other rows are "
        "kept from the previous report, each naming its run and its DP recipe."),
    scale_set: list[str] = typer.Option(
        None, "--scale", help="Override a size, e.g. --scale rounds=2 --scale epsilons=1,8 "
        "(fields of Scale; repeatable)."),
) -> None:
    """Benchmark FedAvg / FFA-LoRA (and baselines) under DP on Banking77 and MedQuAD."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from fedtune.cli.library_logs import quiet_libraries

    quiet_libraries()
    warnings.filterwarnings("ignore", message=".*(Optimal order|Full backward hook).*")
    import torch

    torch.manual_seed(seed)
    # The in-process runs (centralized, local-only) never overlap the simulations' site workers.
    torch.set_num_threads(os.cpu_count() or 1)
    console = Console()
    scale = _override(QUICK if quick else FULL, scale_set or [])
    if scale.dp_fedavgm and (scale.rounds * scale.local_steps) % scale.dp_momentum_rounds:
        raise typer.BadParameter(
            f"--scale dp_momentum_rounds={scale.dp_momentum_rounds} must divide rounds x "
            f"local_steps = {scale.rounds * scale.local_steps} (FedAvgM trains as many steps "
            "per bank as the other methods)")
    if scale.dp_accountant not in ACCOUNTANTS:
        raise typer.BadParameter(f"--scale dp_accountant={scale.dp_accountant}: choose one of "
                                 f"{', '.join(ACCOUNTANTS)}")
    if not (datasets / "banking77").is_dir() or not (datasets / "medquad").is_dir():
        console.print(f"[red]datasets not found under {datasets}[/red]")
        raise typer.Exit(2)
    only = "banking77" if dp_only else only
    out = out or (REPO / "results" / ("quick" if quick else ""))
    work = work or (REPO / "runs" / time.strftime("benchmark-%Y%m%d-%H%M%S"))
    work.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "benchmarks.benchmark_methods", *sys.argv[1:]])
    info = machine()
    t0 = time.time()
    progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), console=console)
    with progress:
        runs = 0
        if only in ("all", "banking77"):
            runs += (len(scale.central_dp_epsilons) + len(scale.local_dp_epsilons)
                     + (len(scale.methods) + scale.dp_fedavgm) * len(scale.epsilons)
                     + len(scale.random_head_epsilons))
            runs += int(scale.noise_free_reference)
            if not dp_only:  # base model, centralized, local-only, federated, encodings
                runs += 3 + len(scale.methods) + len(scale.encodings)
        if only in ("all", "medquad"):
            runs += 4
        name = "benchmark_methods"

        kept, kept_tuning = _kept_results(out / f"{name}.json", only, dp_only)

        def report(results: list[Result], wall: float | None = None) -> tuple[Path, Path | None]:
            rows = _merged(kept, results)
            return write_report(out, name, rows, scale, seed,
                                time.time() - t0 if wall is None else wall, info, command, quick,
                                _origins(rows), _merged_tuning(kept_tuning, bench.tuning, rows))

        bench = Bench(scale, work, seed, console, progress, runs, report)
        if only in ("all", "banking77"):
            bench.banking77(datasets / "banking77", dp_only)
        if only in ("all", "medquad"):
            bench.medquad(datasets / "medquad" / "medquad.jsonl")
    md, plot = report(bench.results, time.time() - t0)
    console.print(md.read_text(), markup=False, highlight=False)
    console.print(f"results: {md}" + (f", plot: {plot}" if plot else ""))


if __name__ == "__main__":
    typer.run(main)
