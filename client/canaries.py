"""White-box gradient canaries of an auditor site, for the one-run audit of Steinke, Nasr &
Jagielski ("Privacy Auditing with One (1) Training Run", NeurIPS 2023, Sec. 7, "Dirac canaries").

Canary i is a record whose per-example gradient is zero except on one coordinate of the LoRA
parameters (a distinct one per canary), where it is `norm_factor` x C (C the clip bound). Each is
in the site's data with probability 1/2 (the auditor's secret). An included canary takes part in
each DP step with the site's Poisson sample rate q, exactly like a real record, and its gradient
goes through the same clipping into the same noised sum (client/trainer.py). Its score is
minus its coordinate in the site's deltas summed over rounds (the canary pushes the parameter
down): high scores are guessed "in", low ones "out" (common/audit_bound.py).

`trace=True` also records the canary coordinates at every step, so that an attack can score the
per-step deltas (what a coordinator sees with one local step per round): the attack that knows
the sample (simulations/audit.py, `audit_known_sample`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fedtune.common.atomic import atomic_write_text

# Canary rows of one clipped pass, at most this many floats (all trainable tensors together).
_PASS_FLOATS = 4_000_000


@dataclass(frozen=True)
class CanarySpec:
    """The auditor's secret: which canaries are in, and where they sit. Stays at the site."""

    included: list[bool]
    coordinate_seed: int
    # Raw gradient norm in units of the clip bound; > 1 so that a mechanism that does not clip
    # lets a larger gradient through (and the audit sees it).
    norm_factor: float = 10.0

    @property
    def m(self) -> int:
        return len(self.included)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self)) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> CanarySpec:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def site_canary_spec(state_dir: Path, run_name: str, m: int) -> Path:
    """A deployed auditor site's canary file for one run (`[audit]` in site.toml): created at
    the run's first message with inclusion bits and coordinates from OS entropy, so that only
    the site knows which canaries are in; reused for the rest of the run (a restart too)."""
    path = Path(state_dir) / "audit" / run_name / "canaries.json"
    if not path.exists():
        rng = np.random.default_rng()
        spec = CanarySpec([bool(b) for b in rng.random(m) < 0.5], int(rng.integers(2**31)))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(asdict(spec)) + "\n")
    return path


def observations_path(spec_path: Path) -> Path:
    """Where the site writes its canary coordinates, one line per round (next to the spec)."""
    return Path(spec_path).with_name("observations.jsonl")


def canary_coordinates(named: list[tuple[str, torch.nn.Parameter]], m: int, seed: int
                       ) -> list[tuple[int, int]]:
    """m distinct (trainable tensor index, flat index) pairs, in LoRA A matrices when they are
    trained (B starts at zero, so real records barely move A early on), else in any LoRA tensor."""
    trainable = [(n, p) for n, p in named if p.requires_grad]  # the trainer's order
    lora = [(i, n, p) for i, (n, p) in enumerate(trainable)
            if ".lora_" in n and ".modules_to_save." not in n]
    pool = [(i, p) for i, n, p in lora if ".lora_A." in n] or [(i, p) for i, _, p in lora]
    sizes = np.array([p.numel() for _, p in pool], dtype=np.int64)
    if sizes.sum() < m:
        raise ValueError(f"{m} canaries need {m} LoRA coordinates; the adapter has {sizes.sum()}")
    flat = np.random.default_rng(seed).choice(int(sizes.sum()), size=m, replace=False)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    which = np.searchsorted(starts, flat, side="right") - 1
    return [(pool[w][0], int(f - starts[w])) for w, f in zip(which, flat, strict=True)]


def would_join(rng: np.random.Generator, m: int, sample_rate: float) -> np.ndarray:
    """Which of m canaries one step's Poisson sample takes, if included: one draw of `rng`
    (whoever can replay `rng` knows it)."""
    return rng.random(m) < sample_rate


class GradientCanaries:
    """The auditor site's canaries for one round of training (see module doc)."""

    def __init__(self, spec: CanarySpec, model: torch.nn.Module,
                 observations: Path | None = None, rng: np.random.Generator | None = None,
                 trace: bool = False):
        self.spec = spec
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.coordinates = canary_coordinates(named, spec.m, spec.coordinate_seed)
        self.included = np.asarray(spec.included, dtype=bool)
        self.observations = observations
        # Which canaries join each step: fresh OS entropy, like the real Poisson sample.
        self.rng = rng or np.random.default_rng()
        self.participations = 0
        # trace: the canary coordinates at the start of each step (before its update).
        self.trace: list[np.ndarray] | None = [] if trace else None

    @classmethod
    def open(cls, spec_path: Path, model: torch.nn.Module) -> GradientCanaries:
        return cls(CanarySpec.load(spec_path), model, observations_path(spec_path))

    def step_passes(self, params: list[torch.nn.Parameter], sample_rate: float,
                    max_grad_norm: float) -> Iterator[list[torch.Tensor]]:
        """Per-example gradient rows (one tensor per trainable parameter) of the canaries that
        the Poisson sample takes into this step, a bounded number of rows per pass."""
        if self.trace is not None:
            self.trace.append(self.current(params))
        joins = self.included & would_join(self.rng, self.spec.m, sample_rate)
        chosen = np.flatnonzero(joins)
        self.participations += len(chosen)
        value = self.spec.norm_factor * max_grad_norm
        per_pass = max(1, _PASS_FLOATS // max(1, sum(p.numel() for p in params)))
        for start in range(0, len(chosen), per_pass):
            part = chosen[start:start + per_pass]
            rows = [torch.zeros((len(part), p.numel()), device=p.device, dtype=p.dtype)
                    for p in params]
            for row, c in enumerate(part):
                tensor, flat = self.coordinates[c]
                rows[tensor][row, flat] = value
            yield [r.view(len(part), *p.shape) for r, p in zip(rows, params, strict=True)]

    def values(self, delta: list[np.ndarray]) -> list[float]:
        """Each canary's coordinate in `delta` (arrays in trainable-parameter order)."""
        return [float(np.asarray(delta[t]).reshape(-1)[f]) for t, f in self.coordinates]

    def current(self, params: list[torch.Tensor]) -> np.ndarray:
        """Each canary's coordinate in `params` now (tensors in trainable-parameter order)."""
        out = np.empty(self.spec.m, dtype=np.float64)
        tensors = np.array([t for t, _ in self.coordinates])
        flats = np.array([f for _, f in self.coordinates])
        for t in np.unique(tensors):
            at = tensors == t
            idx = torch.as_tensor(flats[at], device=params[t].device)
            out[at] = params[t].detach().reshape(-1)[idx].double().cpu().numpy()
        return out

    def step_deltas(self, params: list[torch.Tensor]) -> np.ndarray:
        """(steps, m): each traced step's change of every canary coordinate, the last step's
        up to `params` (the trained parameters)."""
        if self.trace is None:
            raise ValueError("step deltas need GradientCanaries(..., trace=True)")
        return np.diff(np.stack([*self.trace, self.current(params)]), axis=0)

    def observe(self, server_round: int, delta: list[np.ndarray]) -> None:
        """Append this round's canary coordinates of the site's delta to the observations."""
        if self.observations is None:
            return
        line = {"round": server_round, "values": self.values(delta),
                "participations": self.participations}
        with open(self.observations, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")


def whitebox_scores(observations: Path) -> np.ndarray:
    """Minus each canary's coordinate summed over the site's rounds (a retried round counts once,
    its last observation)."""
    rounds: dict[int, list[float]] = {}
    for line in Path(observations).read_text(encoding="utf-8").splitlines():
        if line.strip():
            obs = json.loads(line)
            rounds[int(obs["round"])] = obs["values"]
    if not rounds:
        raise ValueError(f"{observations}: no round observed")
    return -np.sum(np.asarray(list(rounds.values()), dtype=np.float64), axis=0)
