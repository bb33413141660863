"""LoRA via PEFT, and the adapter tensors that travel between sites and server.

The adapter is moved as an ordered list of float32 arrays, one per trainable tensor, in the
order of `model.named_parameters()` (identical at every site and at the server because they
build the same PEFT model from the same config).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from common.config import LoraSettings
from common.models import TaskKind


def apply_lora(base: torch.nn.Module, task: TaskKind, settings: LoraSettings) -> PeftModel:
    """Wrap `base` with a LoRA adapter; A is drawn from a fixed seed so every site agrees."""
    config = LoraConfig(
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,  # None: PEFT's per-architecture default
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.init_seed)
        model = get_peft_model(base, config)
    # PEFT copies the classifier head (modules_to_save) while the model is in eval mode; Opacus
    # records activations only for modules in training mode, and would then fail with
    # "No activations detected for Linear". Put every submodule, the copy included, in train mode.
    model.train()
    return model


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def get_adapter(model: torch.nn.Module) -> list[np.ndarray]:
    return [
        p.detach().to("cpu", torch.float32).numpy().copy()
        for p in model.parameters()
        if p.requires_grad
    ]


@torch.no_grad()
def set_adapter(model: torch.nn.Module, arrays: list[np.ndarray]) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) != len(arrays):
        raise ValueError(f"adapter has {len(arrays)} tensors, model expects {len(params)}")
    for p, a in zip(params, arrays, strict=True):
        if tuple(p.shape) != tuple(a.shape):
            raise ValueError(f"adapter tensor shape {a.shape} != model's {tuple(p.shape)}")
        p.copy_(torch.from_numpy(np.asarray(a)).to(p.device, p.dtype))


def save_adapter(model: PeftModel, directory: Path) -> None:
    """Write adapter_config.json + adapter_model.safetensors atomically (tmp dir, then rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
