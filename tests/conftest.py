"""Shared test helpers. Everything here drives the real stack: no mocks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/datasets next to the checkout (present on the development machines, not in a clone).
SHARED_DATASETS = Path(os.environ.get("FEDTUNE_DATASETS", REPO.parent / "shared" / "datasets"))

# Small settings so a real simulation finishes in about a minute on 2 CPU cores.
FAST = [
    "model.max_length=64",
    "train.local_steps=2",
    "train.batch_size=4",
    "data.demo_records=80",
    "data.max_eval_records=16",
]


def run_fedtune(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `fedtune` CLI in a subprocess (fresh Ray, fresh Flower)."""
    env = {**os.environ, "COLUMNS": "160", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "fedtune", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
    )


def sets(*items: str) -> list[str]:
    out: list[str] = []
    for item in items:
        out += ["--set", item]
    return out


@pytest.fixture
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets not present at {SHARED_DATASETS}")
    return SHARED_DATASETS
