"""Short runs on the real datasets in ../shared/datasets (skipped where it is absent)."""

import json
from pathlib import Path

import pytest

from tests.conftest import run_fedtune, sets

pytestmark = pytest.mark.slow


def _last(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_banking77_dirichlet(tmp_path: Path, shared_datasets: Path):
    res = run_fedtune("simulate", *sets(
        f"output.dir={tmp_path}", "output.run_name=b77", "model.name=all-minilm-l6-v2",
        f"data.train={shared_datasets / 'banking77' / 'train.csv'}",
        f"data.eval={shared_datasets / 'banking77' / 'test.csv'}",
        "data.label_column=category", "data.partition=dirichlet", "data.dirichlet_alpha=0.5",
        "data.max_records_per_site=200", "data.max_eval_records=64", "federation.num_sites=3",
        "federation.rounds=1", "train.local_steps=2", "model.max_length=48",
    ))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    last = _last(tmp_path / "b77")
    assert 0.0 <= last["eval"]["accuracy"] <= 1.0
    assert [s["records"] for s in last["sites"]] == [200, 200, 200]
    config = (tmp_path / "b77" / "config.toml").read_text()
    assert config.count('"') > 77 * 2  # the 77 intents were recorded as the label set


def test_medquad_by_source(tmp_path: Path, shared_datasets: Path):
    res = run_fedtune("simulate", *sets(
        f"output.dir={tmp_path}", "output.run_name=mq",
        f"data.train={shared_datasets / 'medquad' / 'medquad.jsonl'}",
        "data.input_key=question", "data.output_key=answer", "data.partition=column",
        "data.partition_column=source", "data.max_records_per_site=40",
        "data.max_eval_records=8", "federation.num_sites=3", "federation.rounds=1",
        "train.local_steps=1", "train.batch_size=2", "model.max_length=64",
    ))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    last = _last(tmp_path / "mq")
    assert len(last["sites"]) == 3 and last["eval"]["perplexity"] > 1
    # The three largest sources became the three sites.
    sources = set()
    for f in sorted((tmp_path / "mq").glob("sites/site-*/data/train.jsonl")):
        site_sources = {json.loads(x)["source"] for x in f.read_text().splitlines()}
        assert len(site_sources) == 1
        sources |= site_sources
    assert sources == {"GHR", "GARD", "NIDDK"}
    # The header names which site holds which source.
    assert "sites by source: site-0 = GHR, site-1 = GARD, site-2 = NIDDK" in " ".join(
        res.stdout.split())
