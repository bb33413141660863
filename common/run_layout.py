"""Where a run's files live: one definition for the simulator, the coordinator and the report.

    <output.dir>/<run>/config.toml        the effective configuration
    <output.dir>/<run>/eval.jsonl         the coordinator's held-out split
    <output.dir>/<run>/metrics.jsonl      one JSON line per round
    <output.dir>/<run>/checkpoints/round-NNNN/   the global adapter after each round
    <output.dir>/<run>/adapter/           the final global adapter (PEFT format)
    <output.dir>/<run>/sites/site-K/      a simulated site's data and state
    <output.dir>/<run>/audit.json         a privacy audit's result (`fedtune audit`)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    run_dir: Path

    @property
    def config(self) -> Path:
        return self.run_dir / "config.toml"

    @property
    def eval_data(self) -> Path:
        return self.run_dir / "eval.jsonl"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def adapter(self) -> Path:
        return self.run_dir / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def checkpoint(self, server_round: int) -> Path:
        return self.checkpoints / f"round-{server_round:04d}"

    def site_dir(self, site_id: str) -> Path:
        return self.run_dir / "sites" / site_id

    @property
    def audit(self) -> Path:
        """`fedtune audit`'s result (simulations/audit.py); the report reads it."""
        return self.run_dir / "audit.json"


def new_run_name(run_name: str | None) -> str:
    """The configured run name, or a timestamped one."""
    return run_name or time.strftime("run-%Y%m%d-%H%M%S")


def claim_run_dir(run_dir: Path) -> None:
    """Refuse to write into a run directory that already holds something."""
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"run directory {run_dir} already exists; choose another output.run_name"
        )
