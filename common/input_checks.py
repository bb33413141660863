"""Checks of a site's training records, before any training. Every error names file:line:key.

Two levels, because a site daemon starts before it knows the run:

- `check_file_records` (site daemon start-up, `fedtune client [--check]`; `fedtune simulate`):
  what needs no run settings. Every line parses (common/data.py), there is at least one record,
  every record has the keys of the first (a missing column), the usual text fields are non-empty
  strings, and no record is absurdly large (`MAX_RECORD_CHARS`: almost always a broken file, such
  as an unclosed quote in a CSV that swallows the rest of the file).
- `check_task_records` (start of a run at the site, before its privacy ledger spends anything;
  `fedtune simulate` before it writes anything): the run's columns for its task, and for
  classification that every label is in the run's label set.

Texts longer than the model's `model.max_length` are *not* errors: they are truncated (the
prompt from the left, keeping at least half the window for the answer; classification text
from the right), and `long_records` lists those far above it (more than `LONG_CHARS_PER_TOKEN`
characters per token of the window, i.e. about twice the window) for a warning that names them.
`length_report` counts tokens exactly (how many records are cut, how many tokens are lost) and
suggests a `model.max_length` by `MAX_LENGTH_RULE`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedtune.common.config import RunConfig
from fedtune.common.data import DataError, Record, _chat_turns, _field

MAX_RECORD_CHARS = 1_000_000
LONG_CHARS_PER_TOKEN = 8  # ~4 characters per token: 8 per token of the window is ~2x too long
TEXT_KEYS = ("text", "input", "output")  # DataConfig's default text fields
log = logging.getLogger("fedtune.data")


def _size(value: object) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_size(v) for v in value)
    if isinstance(value, dict):
        return sum(_size(v) for v in value.values())
    return len(str(value))


def check_file_records(records: Sequence[Record]) -> None:
    """Run-independent checks (see module docstring); raises DataError naming file:line:key."""
    if not records:
        raise DataError("no records")
    first = records[0]
    keys = list(first.fields)
    for rec in records:
        missing = [k for k in keys if k not in rec.fields]
        if missing:
            raise DataError(
                f"{rec.source}:{rec.line}: missing key '{missing[0]}' (line {first.line} has: "
                f"{', '.join(keys)})"
            )
        for k in TEXT_KEYS:
            if k in rec.fields and (not isinstance(rec.fields[k], str)
                                    or not rec.fields[k].strip()):
                raise DataError(f"{rec.source}:{rec.line}: '{k}' must be a non-empty string")
        if "messages" in rec.fields:
            _chat_turns(rec, "input", "output")
        size = _size(rec.fields)
        if size > MAX_RECORD_CHARS:
            raise DataError(
                f"{rec.source}:{rec.line}: record is {size:,} characters long (limit "
                f"{MAX_RECORD_CHARS:,}): most likely a broken file, e.g. an unclosed quote in a "
                "CSV that runs into the following lines; fix or split the record"
            )


def check_task_records(records: Sequence[Record], cfg: RunConfig, task: str,
                       labels: Sequence[str] | None) -> None:
    """The run's columns and label set; raises DataError naming file:line:key."""
    d = cfg.data
    label_set = set(labels or [])
    for rec in records:
        if task == "classification":
            text = _field(rec, d.text_column)
            if not isinstance(text, str) or not text.strip():
                raise DataError(
                    f"{rec.source}:{rec.line}: '{d.text_column}' must be a non-empty string")
            label = str(_field(rec, d.label_column))
            if label_set and label not in label_set:
                shown = ", ".join(sorted(label_set)[:8]) + (", ..." if len(label_set) > 8 else "")
                raise DataError(
                    f"{rec.source}:{rec.line}: '{d.label_column}' = '{label}' is not in the run's "
                    f"label set ({len(label_set)} labels: {shown}); fix the record or add the "
                    "label to data.labels at the coordinator"
                )
        else:
            _chat_turns(rec, d.input_key, d.output_key)


def _text_chars(rec: Record, cfg: RunConfig, task: str) -> int:
    d = cfg.data
    if task == "classification":
        return _size(rec.fields.get(d.text_column, ""))
    if "messages" in rec.fields:
        return _size(rec.fields["messages"])
    return _size(rec.fields.get(d.input_key, "")) + _size(rec.fields.get(d.output_key, ""))


def long_records(records: Sequence[Record], cfg: RunConfig, task: str) -> list[Record]:
    limit = LONG_CHARS_PER_TOKEN * cfg.model.max_length
    return [r for r in records if _text_chars(r, cfg, task) > limit]


def warn_long_records(records: Sequence[Record], cfg: RunConfig, task: str) -> int:
    """Log one warning naming the records far above model.max_length; returns their number.

    A character estimate (no tokenizer): `length_report` counts the tokens exactly."""
    long = long_records(records, cfg, task)
    if long:
        lines = ", ".join(str(r.line) for r in long[:5]) + (", ..." if len(long) > 5 else "")
        log.warning(
            "%s: %d record(s) are far longer than model.max_length = %d tokens and will be "
            "truncated (lines %s; %d records in all). %s", long[0].source, len(long),
            cfg.model.max_length, lines, len(records), MAX_LENGTH_RULE,
        )
    return len(long)


# The documented rule for model.max_length (README, the truncation report).
MAX_LENGTH_RULE = (
    "Rule for model.max_length: the 95th percentile of the records' token lengths (rounded up "
    "to a multiple of 8), at most the model's own limit; compute and memory per step grow with "
    "it, so a few very long records are better cut than paid for in every batch."
)


@dataclass(frozen=True)
class LengthReport:
    """Token lengths of a run's records against `model.max_length` (what truncation costs)."""

    records: int
    truncated: int  # records longer than max_length tokens
    tokens: int  # tokens of all records, uncut
    tokens_lost: int  # tokens cut off by max_length
    max_length: int
    p95: int  # 95th percentile of the token lengths
    model_limit: int | None  # the model's longest input (position embeddings), if known

    @property
    def suggested(self) -> int:
        """MAX_LENGTH_RULE: p95 rounded up to a multiple of 8, capped by the model's limit."""
        value = max(16, -(-self.p95 // 8) * 8)
        return min(value, self.model_limit or 8192, 8192)

    def message(self) -> str | None:
        """One warning line with a hint, or None when nothing is cut."""
        if not self.truncated:
            return None
        limit = f" (this model's limit: {self.model_limit})" if self.model_limit else ""
        if self.suggested > self.max_length:
            hint = (f"set model.max_length = {self.suggested} to keep 95% of the records whole"
                    f"{limit}; time and memory per step grow with it")
        else:
            hint = ("fewer than 5% of the records are cut: the current value follows the rule "
                    "(95th percentile)")
        return (f"model.max_length = {self.max_length} tokens cuts {self.truncated:,} of "
                f"{self.records:,} records, losing {self.tokens_lost:,} of {self.tokens:,} tokens "
                f"({self.tokens_lost / max(self.tokens, 1):.0%}); {hint}.")


def token_lengths(records: Sequence[Record], tokenizer: object, cfg: RunConfig,
                  task: str) -> list[int]:
    """Each record's length in tokens as the run encodes it, before truncation."""
    from fedtune.common.data import encode_instruction

    d = cfg.data
    if task == "classification":
        texts = [str(_field(r, d.text_column)) for r in records]
        ids = tokenizer(texts, truncation=True, max_length=10**9)["input_ids"]  # type: ignore
        return [len(x) for x in ids]
    return [len(encode_instruction(r, tokenizer, 10**9, d.input_key, d.output_key)["input_ids"])
            for r in records]


def length_report(records: Sequence[Record], tokenizer: object, cfg: RunConfig, task: str,
                  model_limit: int | None = None) -> LengthReport:
    """How many records `model.max_length` cuts and how many tokens that loses."""
    lengths = np.asarray(token_lengths(records, tokenizer, cfg, task) or [0])
    max_len = cfg.model.max_length
    return LengthReport(
        records=len(records), truncated=int((lengths > max_len).sum()),
        tokens=int(lengths.sum()), tokens_lost=int(np.maximum(lengths - max_len, 0).sum()),
        max_length=max_len, p95=int(np.ceil(np.percentile(lengths, 95))),
        model_limit=model_limit,
    )
