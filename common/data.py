"""Data formats: reading JSONL/CSV records and turning them into token ids for the two tasks.

- Instruction tuning (causal LM): `{"input": ..., "output": ...}` (keys configurable) or chat
  `{"messages": [{"role": ..., "content": ...}, ...]}`. The loss covers only the response tokens.
- Text classification: CSV or JSONL with a text column and a label column.

Every malformed record is reported with its file and line number.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100  # label value ignored by the loss (prompt tokens, padding)


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from (for error messages)."""

    fields: dict[str, Any]
    source: str
    line: int


def read_records(path: str | Path) -> list[Record]:
    """Read a .jsonl/.json-lines or .csv file; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if suffix == ".csv":
        records = _read_csv(text, path)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        records = _read_jsonl(text, path)
    else:
        raise DataError(f"{path}: unsupported data format '{suffix}' (use .jsonl or .csv)")
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _read_jsonl(text: str, path: Path) -> list[Record]:
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        out.append(Record(obj, str(path), i))
    return out


def _read_csv(text: str, path: Path) -> list[Record]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames:
        raise DataError(f"{path}:1: missing CSV header")
    out = []
    try:
        for row in reader:
            line = reader.line_num
            if None in row or any(v is None for v in row.values()):
                raise DataError(
                    f"{path}:{line}: expected {len(reader.fieldnames)} columns "
                    f"({', '.join(reader.fieldnames)})"
                )
            out.append(Record(dict(row), str(path), line))
    except csv.Error as e:  # e.g. an unclosed quote that runs into the following lines
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e}); an unclosed quote "
                        "(\") runs into the following lines?") from None
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _field(rec: Record, key: str) -> Any:
    if key not in rec.fields:
        raise DataError(
            f"{rec.source}:{rec.line}: missing key '{key}' (has: {', '.join(rec.fields)})"
        )
    return rec.fields[key]


def person_ids(records: list[Record], column: str) -> list[str]:
    """The person of each record: its value in `column` (data.privacy_unit), as a string.
    A record without it (or with an empty value) is an error naming file:line:key."""
    out = []
    for rec in records:
        if column not in rec.fields:
            raise DataError(
                f"{rec.source}:{rec.line}: missing key '{column}' (data.privacy_unit names the "
                f"person column, which every record needs; has: {', '.join(rec.fields)})")
        value = rec.fields[column]
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{rec.source}:{rec.line}: '{column}' is empty (data.privacy_unit "
                            "needs the person of every record)")
        out.append(str(value))
    return out


def person_groups(persons: list[str]) -> list[list[int]]:
    """Record indices of each person, persons in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, person in enumerate(persons):
        groups.setdefault(person, []).append(i)
    return list(groups.values())


# ---------------------------------------------------------------- instruction tuning


def _chat_turns(rec: Record, input_key: str, output_key: str) -> tuple[list[dict], str]:
    """Prompt messages and the response text of one instruction record."""
    if "messages" in rec.fields:
        msgs = rec.fields["messages"]
        ok = isinstance(msgs, list) and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m
            for m in msgs
        )
        if not ok or not msgs:
            raise DataError(
                f"{rec.source}:{rec.line}: 'messages' must be a non-empty list of "
                '{"role": ..., "content": "..."} objects'
            )
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{rec.source}:{rec.line}: the last message must be the assistant's")
        return [dict(m) for m in msgs[:-1]], msgs[-1]["content"]
    prompt, response = _field(rec, input_key), _field(rec, output_key)
    for key, value in ((input_key, prompt), (output_key, response)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{rec.source}:{rec.line}: '{key}' must be a non-empty string")
    return [{"role": "user", "content": prompt}], response


def encode_instruction(
    rec: Record, tokenizer: Any, max_length: int, input_key: str, output_key: str
) -> dict[str, list[int]]:
    """Token ids and labels; labels are IGNORE_INDEX on the prompt so only the answer is learned."""
    prompt_msgs, response = _chat_turns(rec, input_key, output_key)
    if getattr(tokenizer, "chat_template", None):
        prompt_ids = _as_ids(
            tokenizer.apply_chat_template(prompt_msgs, add_generation_prompt=True, tokenize=True)
        )
        full_ids = _as_ids(
            tokenizer.apply_chat_template(
                [*prompt_msgs, {"role": "assistant", "content": response}], tokenize=True
            )
        )
        if full_ids[: len(prompt_ids)] != prompt_ids:  # template not prefix-stable
            full_ids = prompt_ids + tokenizer(response, add_special_tokens=False)["input_ids"]
        response_ids = full_ids[len(prompt_ids) :]
    else:
        text = "\n".join(m["content"] for m in prompt_msgs) + "\n"
        prompt_ids = tokenizer(text)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response_ids = response_ids + [tokenizer.eos_token_id]
    # Keep at least half the window for the answer: cut the prompt from the left, then the answer.
    keep_prompt = max(max_length - len(response_ids), max_length // 2)
    prompt_ids = prompt_ids[-keep_prompt:] if len(prompt_ids) > keep_prompt else prompt_ids
    response_ids = response_ids[: max_length - len(prompt_ids)]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


def _as_ids(out: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


# ---------------------------------------------------------------- classification


def read_label_set(records: list[Record], label_column: str) -> list[str]:
    return sorted({str(_field(r, label_column)) for r in records})


def encode_classification(
    rec: Record,
    tokenizer: Any,
    max_length: int,
    text_column: str,
    label_column: str,
    label_index: dict[str, int],
) -> dict[str, Any]:
    text = _field(rec, text_column)
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{rec.source}:{rec.line}: '{text_column}' must be a non-empty string")
    label = str(_field(rec, label_column))
    if label not in label_index:
        raise DataError(
            f"{rec.source}:{rec.line}: label '{label}' is not in the label set "
            f"({len(label_index)} labels)"
        )
    ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": ids, "labels": label_index[label]}


# ---------------------------------------------------------------- batching


class EncodedDataset(torch.utils.data.Dataset):
    """Token ids of one site (or of the server's held-out split).

    `persons`: the person of each record (data.privacy_unit / data.person_column), or None."""

    def __init__(self, items: list[dict[str, Any]], persons: list[str] | None = None) -> None:
        if persons is not None and len(persons) != len(items):
            raise ValueError(f"{len(persons)} person ids for {len(items)} records")
        self.items = items
        self.persons = persons

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class PadCollator:
    """Dynamic padding: batches are padded to their own longest sequence, not to max_length."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not batch:  # an empty Poisson-sampled batch (DP-SGD): still a step, of pure noise
            empty = torch.zeros((0, 0), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty, "labels": empty}
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        seq_labels = isinstance(batch[0]["labels"], list)
        labels = (
            torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            if seq_labels
            else torch.tensor([b["labels"] for b in batch], dtype=torch.long)
        )
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            mask[i, :n] = 1
            if seq_labels:
                labels[i, :n] = torch.tensor(b["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# A chunk is closed before an example that would make its padding exceed this share of its
# real tokens (examples come shortest first, so each new one sets the chunk's width).
CHUNK_MAX_PADDING = 0.1


def length_chunks(batch: dict[str, torch.Tensor], min_tokens: int
                  ) -> list[dict[str, torch.Tensor]]:
    """Split a right-padded batch into chunks of examples of similar length, each cut to its own
    longest example: dynamic padding per chunk instead of per batch.

    A DP batch is one Poisson draw and must stay one optimizer step, so its examples are not
    bucketed across batches; within the batch, their order does not matter (per-example
    losses and gradients). A chunk holds at least `min_tokens` real tokens (small matmuls
    waste more than padding does); 0 keeps the batch whole. Every example is in exactly one
    chunk.
    """
    lengths = batch["attention_mask"].sum(dim=1)
    n = int(lengths.shape[0])
    if min_tokens <= 0 or n <= 1:
        return [batch]
    order = torch.argsort(lengths, stable=True)
    sorted_len = lengths[order].tolist()
    bounds, start, real = [], 0, 0
    for i, length in enumerate(sorted_len):
        padded = (i - start + 1) * length  # the chunk's width if this example joins it
        if real >= min_tokens and padded > (1 + CHUNK_MAX_PADDING) * (real + length):
            bounds.append((start, i))
            start, real = i, 0
        real += length
    bounds.append((start, n))
    if len(bounds) == 1:
        return [batch]
    chunks = []
    for a, b in bounds:
        rows, width = order[a:b], int(sorted_len[b - 1])
        chunks.append({k: v[rows, :width] if v.dim() == 2 else v[rows] for k, v in batch.items()})
    return chunks
