"""End-to-end: real Flower simulation (Ray), real Opacus, real PEFT, the embedded models."""

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, run_fedtune, sets

pytestmark = pytest.mark.slow


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_dp_metrics(records: list[dict], num_sites: int) -> None:
    last = records[-1]
    assert len(last["sites"]) == num_sites
    for site in last["sites"]:
        assert site["status"] == "ok"
        assert math.isfinite(site["epsilon"]) and site["epsilon"] > 0
        assert site["noise_multiplier"] > 0


def test_causal_lm_two_sites_one_round(tmp_path: Path):
    res = run_fedtune("simulate", *sets(*FAST, f"output.dir={tmp_path}", "output.run_name=lm",
                                        "federation.num_sites=2", "federation.rounds=1",
                                        "train.lr=0.01"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_dir = tmp_path / "lm"
    records = _metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1]
    assert "perplexity" in records[0]["eval"] and "perplexity" in records[1]["eval"]
    _check_dp_metrics(records, 2)
    # Where a round's time went: the server's parts (sites do not send their timings)
    for site in records[1]["sites"]:
        assert "train_seconds" not in site and "fit_seconds" not in site
    assert records[1]["checkpoint_seconds"] > 0 and "checkpoint_seconds" not in records[0]
    assert 0 < records[1]["evaluate_seconds"] < records[1]["round_seconds"]
    assert "final adapter" in res.stdout and "ε" in res.stdout

    # Each site only got its own file; together they are the training split.
    site_files = sorted(run_dir.glob("sites/site-*/data/train.jsonl"))
    assert len(site_files) == 2
    lines = [set(f.read_text().splitlines()) for f in site_files]
    assert not (lines[0] & lines[1])

    # The adapter loads with PEFT and changes the model's output.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune.common.models import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("Convert 3 kilometres to metres.", return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, run_dir / "adapter")
    with torch.no_grad():
        after = tuned(ids).logits
    assert (after - before).abs().max().item() > 1e-4
    assert (run_dir / "checkpoints" / "round-0001" / "adapter_model.safetensors").exists()


def test_classification_minilm_two_sites(tmp_path: Path):
    res = run_fedtune("simulate", *sets(*FAST, f"output.dir={tmp_path}", "output.run_name=cls",
                                        "model.name=all-minilm-l6-v2", "federation.num_sites=2",
                                        "federation.rounds=1", "train.local_steps=3"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_dir = tmp_path / "cls"
    records = _metrics(run_dir)
    assert {"accuracy", "macro_f1", "loss"} <= set(records[-1]["eval"])
    _check_dp_metrics(records, 2)

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedtune.common.models import resolve_model_path

    path = resolve_model_path("all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["I lost my card", "what is my balance"], return_tensors="pt", padding=True)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=4)
    tuned = PeftModel.from_pretrained(base, run_dir / "adapter")
    with torch.no_grad():
        with tuned.disable_adapter():
            before = tuned(**enc).logits
        after = tuned(**enc).logits
    assert (after - before).abs().max().item() > 1e-4


def test_dp_off_reports_no_epsilon(tmp_path: Path):
    res = run_fedtune("simulate", *sets(*FAST, f"output.dir={tmp_path}", "output.run_name=nodp",
                                        "model.name=all-minilm-l6-v2", "federation.num_sites=2",
                                        "federation.rounds=1", "dp.enabled=false"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    last = _metrics(tmp_path / "nodp")[-1]
    assert all("epsilon" not in s for s in last["sites"])
    assert all(s["status"] == "ok" for s in last["sites"])


def test_malformed_data_fails_before_training(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "c" "output": "d"}\n')
    res = run_fedtune("simulate", *sets(f"output.dir={tmp_path}", f"data.train={bad}"))
    assert res.returncode == 2
    assert f"{bad}:2" in res.stderr.replace("\n", "")
    assert not any(tmp_path.glob("run-*/metrics.jsonl"))
