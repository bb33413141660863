"""Data formats and their errors, with the real tokenizers of the embedded models."""

from pathlib import Path

import pytest

from fedtune.common.config import load_config
from fedtune.common.data import IGNORE_INDEX, DataError, PadCollator, read_records
from fedtune.common.models import load_base_model, resolve_model_path
from fedtune.common.tasks import encode_records


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = _write(tmp_path, "d.jsonl", '{"input": "a", "output": "b"}\n\n{"input": "c", oops}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        read_records(p)
    p2 = _write(tmp_path, "e.jsonl", '{"input": "a", "output": "b"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"e\.jsonl:2: expected a JSON object"):
        read_records(p2)


def test_csv_wrong_column_count_names_line(tmp_path):
    p = _write(tmp_path, "d.csv", "text,label\nhello,a\nbroken\n")
    with pytest.raises(DataError, match=r"d\.csv:3: expected 2 columns"):
        read_records(p)


def test_missing_key_and_empty_and_unknown_format(tmp_path, smol_tokenizer):
    cfg = load_config()
    p = _write(tmp_path, "d.jsonl", '{"input": "a", "output": "b"}\n{"question": "x"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing key 'input'"):
        encode_records(read_records(p), smol_tokenizer, cfg, "causal_lm", None)
    with pytest.raises(DataError, match="no records"):
        read_records(_write(tmp_path, "empty.jsonl", "\n"))
    with pytest.raises(DataError, match="unsupported data format"):
        read_records(_write(tmp_path, "x.parquet", "x"))
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "nope.jsonl")


def test_instruction_loss_only_on_response(tmp_path, smol_tokenizer):
    cfg = load_config()
    p = _write(tmp_path, "d.jsonl",
               '{"input": "What is 2 plus 2?", "output": "2 plus 2 is 4."}\n'
               '{"messages": [{"role": "system", "content": "Be brief."}, '
               '{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]}\n')
    ds = encode_records(read_records(p), smol_tokenizer, cfg, "causal_lm", None)
    for item, answer in zip(ds.items, ["2 plus 2 is 4.", "Hi!"], strict=True):
        ids, labels = item["input_ids"], item["labels"]
        assert len(ids) == len(labels)
        learned = [t for t in labels if t != IGNORE_INDEX]
        n_prompt = labels.index(learned[0])
        assert all(t == IGNORE_INDEX for t in labels[:n_prompt])
        assert answer in smol_tokenizer.decode(learned)
        # The prompt (with the chat template) is not learned.
        assert "<|im_start|>user" in smol_tokenizer.decode(ids[:n_prompt])
    batch = PadCollator(smol_tokenizer.pad_token_id)(ds.items)
    assert batch["input_ids"].shape == batch["labels"].shape
    assert batch["attention_mask"].sum() == sum(len(i["input_ids"]) for i in ds.items)


def test_bad_chat_record(tmp_path, smol_tokenizer):
    cfg = load_config()
    p = _write(tmp_path, "c.jsonl",
               '{"messages": [{"role": "user", "content": "only a question"}]}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:1: the last message must be the assistant"):
        encode_records(read_records(p), smol_tokenizer, cfg, "causal_lm", None)


def test_classification_label_not_in_set(tmp_path):
    cfg = load_config(None, ["data.labels=['a', 'b']"])
    _, tok, _ = load_base_model("all-minilm-l6-v2", "classification", num_labels=2)
    p = _write(tmp_path, "d.csv", "text,label\nhello,a\nworld,c\n")
    with pytest.raises(DataError, match=r"d\.csv:3: label 'c' is not in the label set"):
        encode_records(read_records(p), tok, cfg, "classification", cfg.data.labels)
    ok = _write(tmp_path, "ok.csv", "text,label\nhello,a\nworld,b\n")
    ds = encode_records(read_records(ok), tok, cfg, "classification", cfg.data.labels)
    assert [it["labels"] for it in ds.items] == [0, 1]


def test_offline_hub_id_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from fedtune.common.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="offline|local Hugging Face model directory"):
        load_base_model("some-org/not-a-local-model", "causal_lm")
