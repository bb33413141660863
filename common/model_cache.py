"""One base model + LoRA per process, reused across rounds and across simulated sites."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedtune.common.config import RunConfig
from fedtune.common.lora import apply_lora, get_adapter
from fedtune.common.models import TaskKind, load_base_model


@dataclass
class ModelRuntime:
    model: torch.nn.Module  # PeftModel
    tokenizer: Any
    task: TaskKind
    device: torch.device
    # The freshly initialised adapter (seeded A, zero B). The model is cached per process and
    # later runs in the same process must start from this, not from a previous run's result.
    initial_adapter: list[np.ndarray] = field(default_factory=list)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


_CACHE: dict[tuple, ModelRuntime] = {}


def build_runtime(cfg: RunConfig, task: TaskKind, num_labels: int | None) -> ModelRuntime:
    """The base model wrapped with the configured LoRA adapter (and fedtune's head), built
    afresh. The adapter config names its base: `model.name`, what `fedtune.load` reloads."""
    base, tok, dev = load_base_model(
        cfg.model.name, task, num_labels=num_labels, device=cfg.model.device,
        dtype=cfg.model.dtype, cache_dir=cfg.model.cache_dir, pooling=cfg.task.pooling,
        head_seed=cfg.lora.init_seed,
        labels=cfg.data.labels if task == "classification" else None,
        head_init=cfg.task.head_init,
    )
    model = apply_lora(base, task, cfg.lora, freeze_a=cfg.federation.freeze_lora_a)
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = cfg.model.name
    return ModelRuntime(model, tok, task, dev, get_adapter(model))


def get_runtime(cfg: RunConfig, task: TaskKind, num_labels: int | None) -> ModelRuntime:
    """Load (once per process) the base model wrapped with the configured LoRA adapter."""
    key = (
        cfg.model.name, cfg.model.device, cfg.model.dtype, str(cfg.model.cache_dir), task,
        num_labels, cfg.task.pooling, cfg.task.head_init, tuple(cfg.data.labels or ()),
        cfg.lora.model_dump_json(), cfg.federation.freeze_lora_a,
    )
    if key not in _CACHE:
        _CACHE[key] = build_runtime(cfg, task, num_labels)
    return _CACHE[key]
