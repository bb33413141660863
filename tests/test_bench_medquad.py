"""The MedQuAD benchmark's smoke configuration, end to end: the real script, the real CLI runs
(`fedtune simulate`), the real embedded model; no mocks. About 3-4 minutes on 2 CPU cores."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

RESULTS = [REPO / "results" / f"{stem}{ext}" for stem in ("medquad", "medquad_quick")
           for ext in (".md", ".json", "_loss_vs_eps.png")]


def _stamp() -> dict[Path, float | None]:
    return {p: p.stat().st_mtime if p.exists() else None for p in RESULTS}


def test_medquad_smoke(tmp_path: Path, shared_datasets: Path):
    before = _stamp()
    env = {**os.environ, "FEDTUNE_DATASETS": str(shared_datasets), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_medquad.py", "--smoke", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _stamp() == before, "the smoke mode must not touch results/"

    result = json.loads((tmp_path / "medquad.json").read_text())
    rows, sources = result["rows"], result["sources"]
    assert set(rows) == {"base", "fed/nodp", "fed/dp8"}
    assert len(sources) == 2
    for key, row in rows.items():
        assert set(row["per_source"]) == set(sources), key
        assert all(math.isfinite(v) and v > 0 for v in row["per_source"].values()), key
        assert math.isfinite(row["pooled_loss"]), key
        # pooled = the per-source losses weighted by held-out records: within their range
        assert (min(row["per_source"].values()) - 1e-9 <= row["pooled_loss"]
                <= max(row["per_source"].values()) + 1e-9), key
        assert row["rouge_l"] is not None and 0.0 <= row["rouge_l"] <= 1.0, key
        assert len(row["answers"]) == len(sources) * result["gen_questions"], key

    for key in ("fed/nodp", "fed/dp8"):
        checks = rows[key]["checks"]
        # LoRA starts at B = 0: the loaded run with its adapter off is the server's round 0,
        # and with its adapter on, the server's last evaluation (same records, same code).
        assert checks["loaded_base"] == pytest.approx(checks["server_before"], abs=1e-4), key
        assert checks["loaded_final"] == pytest.approx(checks["server_after"], abs=1e-4), key
        # compute parity: sites x rounds x local steps x batch (smoke: 2 x 1 x 1 x 2)
        assert rows[key]["example_gradients"] == {"per_site": 2, "sites": 2, "total": 4}
    # both runs start from the same pretrained model on the same held-out records
    assert (rows["fed/nodp"]["checks"]["server_before"]
            == pytest.approx(rows["fed/dp8"]["checks"]["server_before"], abs=1e-6))

    dp = rows["fed/dp8"]
    assert dp["epsilon_asked"] == 8.0
    assert 0 < dp["epsilon"] <= dp["epsilon_asked"] + 1e-6  # what the sites' ledgers spent
    assert dp["delta"] == pytest.approx(1e-5)
    assert rows["fed/nodp"]["epsilon"] is None and rows["base"]["epsilon"] is None
    assert rows["base"]["example_gradients"]["total"] == 0

    assert "recovery" in result["targets"]
    assert len(result["examples"]) == 2  # one question per source in smoke mode
    report = (tmp_path / "medquad.md").read_text()
    assert "| row | pooled answer loss | perplexity | ROUGE-L |" in report
    assert "| federated, DP ε = 8 |" in report and "| base model (no training) |" in report
    assert "Recipe chosen without site data:" in report
    assert "Every row: CI smoke" in report  # how the mode cut the compute, under the table
    png = tmp_path / "medquad_loss_vs_eps.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The page can be rewritten from its data alone (no runs), to the same text.
    rendered = tmp_path / "rendered"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_medquad.py", "--render",
         str(tmp_path / "medquad.json"), "--out", str(rendered)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (rendered / "medquad.md").read_text() == report
    assert (rendered / "medquad_loss_vs_eps.png").is_file()
