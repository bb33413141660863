"""The run's data source and its held-out split, shared by the simulator and the coordinator.

The held-out split is drawn once, seeded by `data.seed`, before the rest is divided into sites,
so that no site ever trains on a record the coordinator evaluates on.
"""

from __future__ import annotations

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


def split_eval(cfg: RunConfig, records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(training records, held-out records for the server), both in file order."""
    rng = np.random.default_rng(cfg.data.seed + 1)
    if cfg.data.eval:
        held = read_records(cfg.data.eval)
        return records, sample_uniform(held, cfg.data.max_eval_records, rng)
    perm = rng.permutation(len(records))
    n_eval = max(1, int(len(records) * cfg.data.eval_fraction))
    held = sample_uniform([records[i] for i in sorted(perm[:n_eval])],
                          cfg.data.max_eval_records, rng)
    return [records[i] for i in sorted(perm[n_eval:])], held


def sample_uniform(records: list[Record], n: int, rng: np.random.Generator) -> list[Record]:
    """A uniform subset: the first n of a file sorted by label would hold only a few labels."""
    if len(records) <= n:
        return records
    return [records[i] for i in sorted(rng.choice(len(records), n, replace=False))]
