"""`fedtune audit`: a one-run empirical privacy audit of a federated DP-LoRA run (Steinke, Nasr &
Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023).

Site-0 is the auditor. m canaries are each put in its data with probability 1/2 (its secret);
after the run each is scored, the top and bottom scores are guessed "in" and "out", and the
number of right guesses becomes an epsilon lower bound (common/audit_bound.py) at a stated
confidence, for comparison with the epsilon the site's accountant recorded in its ledger.

- white-box: gradient (Dirac) canaries clipped into the site's DP sum (client/canaries.py);
  score = minus the canary's coordinate in the site's deltas summed over rounds.
- white-box, knowing the sample (`audit_known_sample`, tests): per-step deltas scored over the
  steps in which each canary would have been sampled, replayed from a seed; it catches a sample
  predictable to the coordinator (a test-only broken mode seeds it from the run seed).
- black-box: canary records (random words; a random label for classification) added to the
  site's file; score = the drop of the canary's loss from the initial to the final global model.

A lower bound above the accountant's epsilon means the mechanism that ran leaks more than
accounted: a bug. A lower bound below it proves nothing about the guarantee.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fedtune.client.canaries import (
    CanarySpec,
    GradientCanaries,
    observations_path,
    whitebox_scores,
    would_join,
)
from fedtune.client.randomness import coordinator_seed
from fedtune.client.trainer import train_local
from fedtune.common.audit_bound import audit_bound
from fedtune.common.config import DPConfig, RunConfig, TrainConfig
from fedtune.common.data import EncodedDataset, PadCollator, Record, read_records, write_jsonl
from fedtune.common.ledger import PrivacyLedger
from fedtune.common.lora import get_adapter, set_adapter
from fedtune.common.models import TaskKind
from fedtune.common.privacy import epsilon
from fedtune.common.run_layout import RunLayout
from fedtune.common.tasks import encode_records, num_labels, per_sample_loss, resolve_task
from fedtune.server.recorder import RoundListener
from fedtune.simulations.runner import PreparedRun, prepare_run, run_prepared

Mode = Literal["white-box", "black-box"]
MODES: tuple[Mode, ...] = ("white-box", "black-box")
DEFAULT_CANARIES: dict[str, int] = {"white-box": 1000, "black-box": 200}
MEANING = ("a lower bound: the attack could not show more leakage than this; it does not prove "
           "the guarantee")
AUDITOR = 0  # the auditor is site-0


class AuditError(ValueError):
    """An audit that cannot run as configured."""


@dataclass(frozen=True)
class AuditResult:
    """What `fedtune audit` prints and writes to RUN_DIR/audit.json."""

    mode: str
    m: int
    confidence: float
    delta: float
    accountant: str
    accountant_epsilon: float
    lower_bound: float
    guesses: int
    correct: int
    wall_seconds: float
    audited: str  # what was audited, in words

    @property
    def passed(self) -> bool:
        """No evidence of more leakage than accounted."""
        return self.lower_bound <= self.accountant_epsilon

    def to_dict(self) -> dict[str, Any]:
        tight = self.lower_bound / self.accountant_epsilon if self.accountant_epsilon else None
        return {**asdict(self), "passed": self.passed, "tightness": tight, "meaning": MEANING}

    def write(self, run_dir: Path) -> Path:
        path = RunLayout(Path(run_dir)).audit
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def _inclusion(m: int, rng: np.random.Generator) -> list[bool]:
    return [bool(b) for b in rng.random(m) < 0.5]


def _result(mode: str, scores: np.ndarray, included: list[bool], *, dp: DPConfig,
            accountant_epsilon: float, beta: float, started: float, audited: str,
            ) -> AuditResult:
    bound = audit_bound(scores, included, delta=dp.delta, beta=beta)
    return AuditResult(mode, len(included), 1 - beta, dp.delta, dp.accountant,
                       accountant_epsilon, bound.epsilon, bound.guesses, bound.correct,
                       time.perf_counter() - started, audited)


def audit_local(
    model: torch.nn.Module, dataset: EncodedDataset, *, task: TaskKind, pad_id: int,
    device: torch.device, train: TrainConfig, dp: DPConfig, noise_multiplier: float, steps: int,
    m: int = 1000, beta: float = 0.05, seed: int | None = None,
    train_fn: Callable[..., Any] = train_local,
) -> AuditResult:
    """White-box audit of one site's training alone (no federation): `steps` DP steps of
    `train_fn` (train_local, or a deliberately broken one in tests) with m Dirac canaries, against
    the accountant's epsilon of (noise_multiplier, sample rate, steps)."""
    if not dp.enabled:
        raise AuditError("an audit needs DP (dp.enabled = true)")
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    spec = CanarySpec(_inclusion(m, rng), int(rng.integers(2**31)))
    canaries = GradientCanaries(spec, model, rng=rng)
    before = get_adapter(model)
    result = train_fn(model, dataset, task=task, pad_id=pad_id, device=device, train=train,
                      dp=dp, noise_multiplier=noise_multiplier, steps=steps,
                      seed=None if seed is None else int(rng.integers(2**31)),
                      canaries=canaries)
    delta = [a - b for a, b in zip(get_adapter(model), before, strict=True)]
    scores = -np.asarray(canaries.values(delta))
    eps = epsilon([(noise_multiplier, result.sample_rate, steps)], dp.delta, dp.accountant)
    return _result("white-box", scores, spec.included, dp=dp, accountant_epsilon=eps, beta=beta,
                   started=started, audited=f"one site's DP-SGD ({steps} steps), no federation")


def audit_known_sample(
    model: torch.nn.Module, dataset: EncodedDataset, *, task: TaskKind, pad_id: int,
    device: torch.device, train: TrainConfig, dp: DPConfig, noise_multiplier: float, steps: int,
    run_seed: int, predictable: bool = False, m: int = 1000, beta: float = 0.05,
    site_id: str = "site-0", train_fn: Callable[..., Any] = train_local,
) -> tuple[AuditResult, AuditResult]:
    """White-box audit of one site's training by an attacker who knows the run seed and
    observes every step's delta (a coordinator does, with one local step per round).

    It replays the canaries' Poisson participation from coordinator_seed(run_seed, site_id, 1),
    the seed fedtune's sites once derived it from, and scores canary i by minus the sum of its
    coordinate's deltas over the k_i steps that would have sampled it, divided by sqrt(k_i): with
    the sample known this is a k-fold Gaussian mechanism, without amplification by subsampling.

    `predictable=True` is a deliberately broken mechanism (tests only): the canaries' sample is
    drawn from that seed, so the attack knows it. False (fedtune's mechanism): it is drawn from
    OS entropy and the replayed sample is unrelated to it.

    Returns (this attack, audit_local's final-delta score on the same run)."""
    if not dp.enabled:
        raise AuditError("an audit needs DP (dp.enabled = true)")
    started = time.perf_counter()
    rng = np.random.default_rng()  # the auditor's secret: which canaries are in, and where
    spec = CanarySpec(_inclusion(m, rng), int(rng.integers(2**31)))
    seed = coordinator_seed(run_seed, site_id, 1)
    site_rng = np.random.default_rng(seed) if predictable else None  # None: OS entropy
    canaries = GradientCanaries(spec, model, rng=site_rng, trace=True)
    result = train_fn(model, dataset, task=task, pad_id=pad_id, device=device, train=train,
                      dp=dp, noise_multiplier=noise_multiplier, steps=steps, seed=None,
                      canaries=canaries)
    params = [p for p in model.parameters() if p.requires_grad]
    deltas = canaries.step_deltas(params)  # (steps, m)
    if len(deltas) != steps:
        raise AuditError(f"traced {len(deltas)} steps of {steps}")
    replay = np.random.default_rng(seed)
    joins = np.stack([would_join(replay, m, result.sample_rate) for _ in range(steps)])
    k = joins.sum(axis=0)
    aware = -(deltas * joins).sum(axis=0) / np.sqrt(np.maximum(k, 1))
    eps = epsilon([(noise_multiplier, result.sample_rate, steps)], dp.delta, dp.accountant)
    what = f"one site's DP-SGD ({steps} steps, q = {result.sample_rate:.3g})"
    sample = "predictable from the run seed" if predictable else "secret"
    found = _result("white-box", aware, spec.included, dp=dp, accountant_epsilon=eps,
                    beta=beta, started=started,
                    audited=f"{what}, per-step deltas scored over the sample replayed from the "
                            f"run seed (sample {sample})")
    final = _result("white-box", -deltas.sum(axis=0), spec.included, dp=dp,
                    accountant_epsilon=eps, beta=beta, started=started,
                    audited=f"{what}, final delta (sample {sample})")
    return found, final


# Black-box canary records ---------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 8)))


def canary_records(cfg: RunConfig, task: TaskKind, m: int, rng: random.Random) -> list[dict]:
    """m input-space canaries: random words; a random label (classification) or a random answer
    (instruction tuning). Unlike any real record, so only memorisation lowers their loss."""
    d = cfg.data
    out = []
    for _ in range(m):
        text = " ".join(_word(rng) for _ in range(8))
        if task == "classification":
            out.append({d.text_column: text, d.label_column: rng.choice(d.labels or [])})
        else:
            out.append({d.input_key: text,
                        d.output_key: " ".join(_word(rng) for _ in range(6))})
    return out


def _losses(model: torch.nn.Module, data: EncodedDataset, task: TaskKind, pad_id: int,
            device: torch.device) -> np.ndarray:
    collate = PadCollator(pad_id)
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data), 32):
            batch = collate([data[j] for j in range(i, min(i + 32, len(data)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            out.append(per_sample_loss(model, batch, task).float().cpu().numpy())
    model.train()
    return np.concatenate(out)


def blackbox_scores(cfg: RunConfig, run_dir: Path, records: list[dict]) -> np.ndarray:
    """Loss of each canary under the initial adapter minus under the final global adapter."""
    from fedtune.common.model_cache import get_runtime
    from fedtune.server.state import load_checkpoint

    task = resolve_task(cfg)
    rt = get_runtime(cfg, task, num_labels(cfg, task))
    data = encode_records([Record(r, "canary", i + 1) for i, r in enumerate(records)],
                          rt.tokenizer, cfg, task, cfg.data.labels)
    set_adapter(rt.model, rt.initial_adapter)
    before = _losses(rt.model, data, task, rt.pad_id, rt.device)
    load_checkpoint(rt.model, RunLayout(run_dir).adapter)
    after = _losses(rt.model, data, task, rt.pad_id, rt.device)
    set_adapter(rt.model, rt.initial_adapter)
    return before - after


# The federated audit --------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditPlan:
    """What the auditor site holds: its secret and, for black-box, its canary records."""

    mode: Mode
    included: list[bool]
    records: list[dict]  # black-box canaries (all m, in and out)
    spec_path: Path | None  # white-box


def add_auditor(prepared: PreparedRun, mode: Mode, m: int, seed: int | None = None
                ) -> AuditPlan:
    """Make site-0 the auditor: canaries in its data (black-box) or its DP sum (white-box)."""
    if mode not in MODES:
        raise AuditError(f"unknown audit mode {mode!r}; choose one of: {', '.join(MODES)}")
    if not prepared.cfg.dp.enabled:
        raise AuditError("an audit needs DP at the sites (dp.enabled = true)")
    rng = np.random.default_rng(seed)
    included = _inclusion(m, rng)
    site = prepared.sites[AUDITOR]
    audit_dir = site.state_dir.parent / "audit"
    if mode == "white-box":
        path = audit_dir / "canaries.json"
        CanarySpec(included, int(rng.integers(2**31))).save(path)
        prepared.sites[AUDITOR] = replace(site, canaries=path)
        return AuditPlan(mode, included, [], path)
    task = resolve_task(prepared.cfg)
    records = canary_records(prepared.cfg, task, m, random.Random(int(rng.integers(2**31))))
    real = [r.fields for r in read_records(site.data_path)]
    write_jsonl(site.data_path, real + [r for r, i in zip(records, included, strict=True) if i])
    write_jsonl(audit_dir / "canaries.jsonl",
                [{"record": r, "included": i} for r, i in zip(records, included, strict=True)])
    return AuditPlan(mode, included, records, None)


def accountant_epsilon(prepared: PreparedRun) -> float:
    """The run's epsilon at the auditor site, from its ledger (what the report states)."""
    site = prepared.sites[AUDITOR]
    ledger = PrivacyLedger(site.state_dir, site.site_id)
    history = ledger.history(prepared.run_id)
    if not history:
        raise AuditError(f"{site.site_id} trained no DP round in run {prepared.run_id}")
    dp = prepared.cfg.dp
    return epsilon(history, dp.delta, dp.accountant)


def audit_site(state_dir: Path, site_id: str, run_id: str, beta: float = 0.05) -> AuditResult:
    """White-box audit of a deployed auditor site's run (`[audit]` in its site.toml): its
    secret canaries and their coordinates in the deltas it sent, against the ε its own ledger
    recorded for the run. Written to STATE_DIR/audit/RUN/audit.json."""
    started = time.perf_counter()
    spec_path = Path(state_dir) / "audit" / run_id / "canaries.json"
    observations = observations_path(spec_path)
    if not observations.exists():
        raise AuditError(f"{spec_path.parent}: no canary observations for run {run_id!r} (is "
                         "[audit] white_box_canaries set in this site's site.toml, and did the "
                         "site train in that run?)")
    ledger = PrivacyLedger(state_dir, site_id)
    plan, history = ledger.plan(run_id), ledger.history(run_id)
    if plan is None or not history:
        raise AuditError(f"{site_id} trained no DP round in run {run_id!r} (its ledger in "
                         f"{state_dir})")
    dp = DPConfig(delta=plan.delta, accountant=plan.accountant)  # type: ignore[arg-type]
    result = _result("white-box", whitebox_scores(observations),
                     CanarySpec.load(spec_path).included, dp=dp,
                     accountant_epsilon=epsilon(history, plan.delta, plan.accountant),
                     beta=beta, started=started,
                     audited=f"{site_id}'s DP-SGD over all rounds of a deployed run (the deltas "
                             "it sent), gradient canaries")
    (spec_path.parent / "audit.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n",
                                                 encoding="utf-8")
    return result


def run_audit(cfg: RunConfig, mode: Mode = "white-box", m: int | None = None,
              beta: float = 0.05, listener: RoundListener | None = None, verbose: bool = False,
              seed: int | None = None,
              on_prepared: Callable[[PreparedRun], None] | None = None) -> AuditResult:
    """Prepare and run a federated simulation with an auditor site-0, then audit it; the result
    is also written to RUN_DIR/audit.json."""
    started = time.perf_counter()
    m = m or DEFAULT_CANARIES[mode]
    prepared = prepare_run(cfg)
    plan = add_auditor(prepared, mode, m, seed)
    if on_prepared is not None:
        on_prepared(prepared)
    run_prepared(prepared, listener=listener, verbose=verbose)
    if plan.spec_path is not None:
        scores = whitebox_scores(observations_path(plan.spec_path))
        audited = "site-0's DP-SGD over all rounds (its deltas), gradient canaries"
    else:
        scores = blackbox_scores(prepared.cfg, prepared.run_dir, plan.records)
        audited = "the final global model (canary records' loss)"
    result = _result(mode, scores, plan.included, dp=prepared.cfg.dp,
                     accountant_epsilon=accountant_epsilon(prepared), beta=beta,
                     started=started, audited=audited)
    result.write(prepared.run_dir)
    return result
