"""Task logic shared by sites and server: encoding records, the per-sample loss, evaluation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedtune.common.config import RunConfig
from fedtune.common.data import (
    IGNORE_INDEX,
    EncodedDataset,
    PadCollator,
    Record,
    encode_classification,
    encode_instruction,
)
from fedtune.common.head_loss import frozen_head_cross_entropy, is_frozen_linear_head
from fedtune.common.models import TaskKind


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


# Causal LMs whose forward is exactly `lm_head(decoder(...).last_hidden_state)` (no logit scaling
# or soft-capping), for which the LM head can be applied to the labelled positions only.
_PLAIN_LM_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})


def _lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder body, LM head) of a (PEFT-, Opacus-wrapped) causal LM, or None if unknown."""
    inner = getattr(model, "_module", model)  # Opacus GradSampleModule
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PeftModel
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in _PLAIN_LM_HEAD_TYPES:
        return None
    if not (hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings")):
        return None
    head = base.get_output_embeddings()
    return (base.get_decoder(), head) if head is not None else None


def label_token_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal LM: next-token cross-entropy at every labelled position.

    Returns (losses [N], row of each loss [N], labelled tokens per row [B]). For the plain
    architectures above, the LM head (hidden x vocabulary, the largest matmul of a small model)
    runs only on the N labelled positions, not on all B x T (prompt and padding included); the
    math is the same as taking the full logits and ignoring unlabelled positions. A frozen,
    bias-free head (LoRA's case) goes through common/head_loss.py: no N x vocabulary tensor.
    """
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    rows = torch.arange(labels.size(0), device=labels.device).unsqueeze(1).expand_as(labels)[mask]
    parts = _lm_parts(model)
    if parts is None:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1][mask].float()
    else:
        body, head = parts
        hidden = body(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        picked = hidden[:, :-1][mask]
        if is_frozen_linear_head(head):
            losses = frozen_head_cross_entropy(picked, head, labels[mask])
            return losses, rows, mask.sum(dim=1)
        logits = head(picked).float()
    return F.cross_entropy(logits, labels[mask], reduction="none"), rows, mask.sum(dim=1)


def per_sample_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: TaskKind):
    """Loss of each example (shape [B]).

    Reduced per sample, not per token, so that each example's gradient is one example's
    contribution: what DP-SGD clips, and what Opacus' loss_reduction="mean" assumes.
    """
    if task != "classification":
        tok_loss, rows, n_tok = label_token_losses(model, batch)
        total = torch.zeros(n_tok.shape[0], dtype=tok_loss.dtype, device=tok_loss.device)
        return total.index_add(0, rows, tok_loss) / n_tok.clamp(min=1)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(out.logits.float(), batch["labels"], reduction="none")


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
        if task != "classification":
            tok_loss, _, n_tok = label_token_losses(model, batch)
            total_loss += tok_loss.sum().item()
            total_tokens += int(n_tok.sum())
            continue
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits.float()
        total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        total_tokens += batch["labels"].numel()
        preds.append(logits.argmax(-1).cpu().numpy())
        golds.append(batch["labels"].cpu().numpy())
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
    from fedtune.common.models import default_task

    return default_task(cfg.model.name) if cfg.task.kind == "auto" else cfg.task.kind


def num_labels(cfg: RunConfig, task: TaskKind) -> int | None:
    if task != "classification":
        return None
    if not cfg.data.labels:
        raise ValueError("classification needs data.labels (the simulation fills it from the data)")
    return len(cfg.data.labels)
