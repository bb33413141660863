"""LoRA via PEFT, and the adapter tensors that travel between sites and server.

The adapter is moved as an ordered list of float32 arrays, one per trainable tensor, in the
order of `model.named_parameters()` (identical at every site and at the server because they
build the same PEFT model from the same config).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from fedtune.common.atomic import fsync_dir
from fedtune.common.config import LoraSettings
from fedtune.common.models import TaskKind


def apply_lora(
    base: torch.nn.Module, task: TaskKind, settings: LoraSettings, *, freeze_a: bool = False
) -> PeftModel:
    """Wrap `base` with a LoRA adapter; A is drawn from a fixed seed so every site agrees.

    `freeze_a` (FFA-LoRA): A is never trained nor sent, so every site must hold the very same A
    without receiving it. It is redrawn on the CPU from (init_seed, module name), which gives the
    same values on CPU and GPU sites, with PEFT's distribution (kaiming-uniform, a=sqrt(5):
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))); B stays zero, and only B (and any head) is trainable.
    """
    from fedtune.common.heads import MeanPoolingClassifier

    custom_head = isinstance(base, MeanPoolingClassifier)
    config = LoraConfig(
        # PEFT's SEQ_CLS wrapper expects Hugging Face's head; fedtune's own head is a plain
        # module whose classifier PEFT trains in full and saves next to LoRA (modules_to_save).
        task_type=None if custom_head else
        ("SEQ_CLS" if task == "classification" else "CAUSAL_LM"),
        modules_to_save=["classifier"] if custom_head else None,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,  # None: PEFT's per-architecture default
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.init_seed)
        model = get_peft_model(base, config)
    if freeze_a:
        _freeze_lora_a(model, settings.init_seed)
    # PEFT copies the classifier head (modules_to_save) while the model is in eval mode; Opacus
    # records activations only for modules in training mode, and would then fail with
    # "No activations detected for Linear". Put every submodule, the copy included, in train mode.
    model.train()
    return model


@torch.no_grad()
def _freeze_lora_a(model: torch.nn.Module, seed: int) -> None:
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            bound = 1.0 / math.sqrt(p.shape[1])
            a = torch.rand(tuple(p.shape), generator=gen, dtype=torch.float64) * 2 * bound - bound
            p.copy_(a.to(p.device, p.dtype))
            p.requires_grad_(False)


def lora_a_digest(model: torch.nn.Module) -> str:
    """CRC32 of every LoRA A matrix (float32 bytes): equal digests mean identical frozen As."""
    crc = 0
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            crc = zlib.crc32(p.detach().to("cpu", torch.float32).numpy().tobytes(), crc)
    return f"{crc:08x}"


LAYOUT_METRIC = "adapter_layout"  # fit-reply metric carrying a site's adapter_layout()


def adapter_layout(model: torch.nn.Module) -> str:
    """CRC32 of the trainable tensors' names and shapes, in transfer order: a site sends it with
    each update and the server compares it with its own (server/validation.py). Not the dtypes:
    a GPU site may train in bfloat16; every update travels as float32."""
    crc = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            crc = zlib.crc32(f"{name}:{tuple(p.shape)};".encode(), crc)
    return f"{crc:08x}"


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


def _save_pretrained(model: PeftModel, directory: Path) -> None:
    """PEFT's save_pretrained, with adapter_config.json naming the base the model was built
    from (common/model_cache.py sets it: `model.name`). PEFT looks a set name up on the model
    hub at every save (has the vocabulary changed?), so the name is written afterwards."""
    configs = model.peft_config
    bases = {k: c.base_model_name_or_path for k, c in configs.items()}
    for c in configs.values():
        c.base_model_name_or_path = None
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        for k, c in configs.items():
            c.base_model_name_or_path = bases[k]
    base = bases.get("default")
    path = directory / "adapter_config.json"
    if base and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        data["base_model_name_or_path"] = base
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_adapter(model: PeftModel, directory: Path, card: str | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors atomically (tmp dir, then rename);
    `card` replaces PEFT's empty README.md template (common/loading.py::model_card)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        _save_pretrained(model, tmp)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        old = directory.with_name(f".{directory.name}.old")
        if old.exists():  # a crash between the two renames below: `old` is the last good one
            if directory.exists():
                shutil.rmtree(old)
            else:
                os.replace(old, directory)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        fsync_dir(directory.parent)  # the renames are durable before the round counts as done
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
