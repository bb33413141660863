"""What a run tells its user, without a simulation: how many held-out records are evaluated,
what `model.max_length` cuts, and when the held-out loss diverges."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from fedtune.common.config import load_config
from fedtune.common.data import Record
from fedtune.common.input_checks import length_report
from fedtune.common.splits import AUTO_EVAL_CAP, split_eval
from fedtune.server.divergence import DivergenceWatch


def _records(n: int, source: str = "t") -> list[Record]:
    return [Record({"text": f"record {i}", "label": "a"}, source, i + 1) for i in range(n)]


def test_supplied_eval_file_is_used_whole_unless_capped(tmp_path: Path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": "a"}) + "\n"
                            for i in range(578)))
    cfg = load_config(None, [f"data.eval={path}", "model.name=all-minilm-l6-v2"])
    train, held = split_eval(cfg, _records(100))
    assert len(train) == 100 and len(held.records) == held.available == 578
    capped = load_config(None, [f"data.eval={path}", "data.max_eval_records=64"])
    _, held = split_eval(capped, _records(100))
    assert len(held.records) == 64 and held.available == 578
    assert len({r.line for r in held.records}) == 64  # a uniform sample, not the first 64
    assert max(r.line for r in held.records) > 64


def test_automatic_split_is_seeded_and_capped():
    cfg = load_config(None, [])
    train, held = split_eval(cfg, _records(10_000))
    assert held.available == 1000 and len(held.records) == AUTO_EVAL_CAP
    assert len(train) == 9000
    assert not {r.line for r in train} & {r.line for r in held.records}
    again = split_eval(cfg, _records(10_000))[1]
    assert [r.line for r in again.records] == [r.line for r in held.records]


def test_length_report_counts_cut_records_and_lost_tokens():
    from transformers import AutoTokenizer

    from fedtune.common.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("all-minilm-l6-v2"))
    texts = ["short text", " ".join(["word"] * 100), " ".join(["word"] * 300)]
    recs = [Record({"text": t, "label": "a"}, "t", i + 1) for i, t in enumerate(texts)]
    cfg = load_config(None, ["model.name=all-minilm-l6-v2", "model.max_length=50"])
    rep = length_report(recs, tok, cfg, "classification", model_limit=512)
    lengths = [len(tok(t)["input_ids"]) for t in texts]  # with [CLS] and [SEP]
    assert rep.truncated == 2 and rep.tokens == sum(lengths)
    assert rep.tokens_lost == sum(n - 50 for n in lengths if n > 50)
    assert rep.suggested % 8 == 0 and 50 < rep.suggested <= 512
    msg = rep.message()
    assert "cuts 2 of 3 records" in msg and f"model.max_length = {rep.suggested}" in msg
    fits = load_config(None, ["model.name=all-minilm-l6-v2", "model.max_length=400"])
    assert length_report(recs, tok, fits, "classification").message() is None


def test_divergence_rule_and_hint():
    cfg = load_config(None, ["model.name=all-minilm-l6-v2", "train.lr=0.5",
                             "train.head_lr=5"])
    ok = [np.ones(3, dtype=np.float32)]
    watch = DivergenceWatch(cfg, log_warning=False)
    assert watch.check(0, {"loss": 1.4}, ok) is None
    assert watch.check(1, {"loss": 2.7}, ok) is None  # below 2x the start
    assert watch.check(2, None, ok) is None  # not evaluated this round
    found = watch.check(3, {"loss": 8.0}, ok)
    assert found["first"] and found["start_loss"] == 1.4
    assert "train.lr" in found["hint"] and "train.head_lr" in found["hint"]
    assert "DP-SGD" in found["cause"]
    assert not watch.check(4, {"loss": 9.0}, ok)["first"]  # warned once, recorded each round
    # A near-zero start loss needs a real rise (0.5 nats), not just 2x.
    small = DivergenceWatch(cfg, log_warning=False)
    small.check(0, {"loss": 0.05}, ok)
    assert small.check(1, {"loss": 0.2}, ok) is None
    # NaN in the aggregate is divergence even without an evaluation.
    nan = DivergenceWatch(cfg, log_warning=False)
    nan.check(0, {"loss": 1.0}, ok)
    found = nan.check(1, None, [np.array([math.nan], dtype=np.float32)])
    assert found and not found["adapter_finite"]
