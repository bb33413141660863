"""The run's data source and its held-out split, shared by the simulator and the coordinator.

The held-out split is drawn once, seeded by `data.seed`, before the rest is divided into sites,
so that no site ever trains on a record the coordinator evaluates on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtune.common.config import RunConfig
from fedtune.common.data import Record, read_records
from fedtune.common.demo_data import classification_demo, instruction_demo


def load_source(cfg: RunConfig, task: str) -> list[Record]:
    """The run's training source: fedtune's demo data or the `data.train` file."""
    if cfg.data.train == "demo":
        rows = (classification_demo if task == "classification" else instruction_demo)(
            cfg.data.demo_records, cfg.data.seed
        )
        return [Record(r, "demo", i + 1) for i, r in enumerate(rows)]
    return read_records(cfg.data.train)


# Without data.eval, at most this many held-out records are evaluated (data.max_eval_records
# unset): the server evaluates every round, and 500 records keep that to seconds on a CPU.
AUTO_EVAL_CAP = 500


@dataclass(frozen=True)
class HeldOut:
    """The server's evaluation records and where they came from (for the run header)."""

    records: list[Record]
    available: int  # records in the eval file or the held-out share before the cap
    source: str  # the eval file, or "held out from data.train"


def eval_cap(cfg: RunConfig) -> int | None:
    """How many held-out records are evaluated at most (None: all)."""
    if cfg.data.max_eval_records is not None:
        return cfg.data.max_eval_records
    return None if cfg.data.eval else AUTO_EVAL_CAP


def split_eval(cfg: RunConfig, records: list[Record]) -> tuple[list[Record], HeldOut]:
    """(training records, the server's held-out records), both in file order.

    A supplied `data.eval` file is evaluated whole unless `data.max_eval_records` caps it;
    otherwise `data.eval_fraction` of `records` is held out (seeded by `data.seed`) and at most
    `eval_cap` of them are evaluated."""
    rng = np.random.default_rng(cfg.data.seed + 1)
    cap = eval_cap(cfg)
    if cfg.data.eval:
        held = read_records(cfg.data.eval)
        return records, HeldOut(sample_uniform(held, cap, rng), len(held), cfg.data.eval)
    perm = rng.permutation(len(records))
    n_eval = max(1, int(len(records) * cfg.data.eval_fraction))
    held = [records[i] for i in sorted(perm[:n_eval])]
    return ([records[i] for i in sorted(perm[n_eval:])],
            HeldOut(sample_uniform(held, cap, rng), len(held), "held out from data.train"))


def sample_uniform(records: list[Record], n: int | None,
                   rng: np.random.Generator) -> list[Record]:
    """A uniform subset (all when n is None): the first n of a file sorted by label would hold
    only a few labels."""
    if n is None or len(records) <= n:
        return records
    return [records[i] for i in sorted(rng.choice(len(records), n, replace=False))]
