"""Task logic shared by sites and server: encoding records, the per-sample loss, evaluation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.config import RunConfig
from common.data import (
    IGNORE_INDEX,
    EncodedDataset,
    PadCollator,
    Record,
    encode_classification,
    encode_instruction,
)
from common.models import TaskKind


def encode_records(
    records: list[Record], tokenizer: Any, cfg: RunConfig, task: TaskKind, labels: list[str] | None
) -> EncodedDataset:
    d, max_len = cfg.data, cfg.model.max_length
    if task == "classification":
        index = {name: i for i, name in enumerate(labels or [])}
        items = [
            encode_classification(r, tokenizer, max_len, d.text_column, d.label_column, index)
            for r in records
        ]
    else:
        items = [
            encode_instruction(r, tokenizer, max_len, d.input_key, d.output_key) for r in records
        ]
    return EncodedDataset(items)


def per_sample_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: TaskKind):
    """Loss of each example (shape [B]).

    Reduced per sample, not per token, so that each example's gradient is one example's
    contribution: what DP-SGD clips, and what Opacus' loss_reduction="mean" assumes.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits.float()
    if task == "classification":
        return F.cross_entropy(logits, batch["labels"], reduction="none")
    labels = batch["labels"][:, 1:]
    tok_loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(labels.shape)
    n_tok = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return tok_loss.sum(dim=1) / n_tok


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: EncodedDataset,
    task: TaskKind,
    pad_id: int,
    device: torch.device,
    batch_size: int = 16,
) -> dict[str, float]:
    """Held-out metrics: loss and perplexity (causal LM); loss, accuracy, macro-F1 (classif.)."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, collate_fn=PadCollator(pad_id)
    )
    total_loss, total_tokens = 0.0, 0
    preds, golds = [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits.float()
        if task == "classification":
            total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            total_tokens += batch["labels"].numel()
            preds.append(logits.argmax(-1).cpu().numpy())
            golds.append(batch["labels"].cpu().numpy())
        else:
            labels = batch["labels"][:, 1:]
            total_loss += F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).item()
            total_tokens += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    loss = total_loss / max(total_tokens, 1)
    if task == "classification":
        p, g = np.concatenate(preds), np.concatenate(golds)
        return {"loss": loss, "accuracy": float((p == g).mean()), "macro_f1": macro_f1(p, g)}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def macro_f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes present in gold or pred."""
    scores = []
    for c in np.union1d(pred, gold):
        tp = np.sum((pred == c) & (gold == c))
        fp = np.sum((pred == c) & (gold != c))
        fn = np.sum((pred != c) & (gold == c))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def resolve_task(cfg: RunConfig) -> TaskKind:
    """The configured task, or the one the embedded model is meant for."""
    from common.models import default_task

    return default_task(cfg.model.name) if cfg.task.kind == "auto" else cfg.task.kind


def num_labels(cfg: RunConfig, task: TaskKind) -> int | None:
    if task != "classification":
        return None
    if not cfg.data.labels:
        raise ValueError("classification needs data.labels (the simulation fills it from the data)")
    return len(cfg.data.labels)
