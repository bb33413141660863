"""A batch run as length chunks (common/data.py::length_chunks) trains exactly as the whole batch.

Real MiniLM, real PEFT LoRA, real Opacus DP-SGD (Poisson sampling, per-example clipping).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fedtune.client.trainer import train_local
from fedtune.common.config import DPConfig, LoraSettings, TrainConfig
from fedtune.common.data import EncodedDataset, PadCollator, length_chunks
from fedtune.common.lora import apply_lora, get_adapter, set_adapter
from fedtune.common.models import load_base_model


def _items(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(1000, 2000) for _ in range(rng.randint(3, 30))],
             "labels": rng.randrange(4)} for _ in range(n)]


def _rows(batch: dict) -> list[tuple]:
    """Each example as (its real token ids, its label), padding stripped."""
    return [(tuple(ids[: int(m.sum())].tolist()), int(lab))
            for ids, m, lab in zip(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                   strict=True)]


@pytest.mark.parametrize("min_tokens", [1, 40, 200])
def test_chunks_hold_every_example_once_each_cut_to_its_longest(min_tokens):
    batch = PadCollator(0)(_items(64))
    chunks = length_chunks(batch, min_tokens)
    assert len(chunks) > 1
    assert sorted(r for c in chunks for r in _rows(c)) == sorted(_rows(batch))
    for c in chunks:
        assert c["input_ids"].shape[1] == int(c["attention_mask"].sum(dim=1).max())
    for c in chunks[:-1]:  # the last chunk takes what is left
        assert int(c["attention_mask"].sum()) >= min_tokens
    padded = sum(c["input_ids"].numel() for c in chunks)
    assert padded < batch["input_ids"].numel()  # the point: less padding to compute on


def test_zero_or_one_example_keeps_the_batch_whole():
    batch = PadCollator(0)(_items(8))
    assert length_chunks(batch, 0) == [batch]
    one = PadCollator(0)(_items(1))
    assert length_chunks(one, 1) == [one]


@pytest.fixture(scope="module")
def minilm():
    base, tok, _ = load_base_model("all-minilm-l6-v2", "classification", num_labels=4)
    model = apply_lora(base, "classification", LoraSettings(r=4, init_seed=3))
    with torch.no_grad():  # B starts at zero; make LoRA's A get gradients too
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    for m in model.modules():  # dropout masks depend on tensor shapes: compare without them
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model, tok


@pytest.mark.parametrize("dp_enabled", [True, False])
def test_training_in_chunks_equals_training_on_the_whole_batch(minilm, dp_enabled):
    model, tok = minilm
    data = EncodedDataset(_items(48, seed=1))
    start = get_adapter(model)
    # Small clipping bound: every example is clipped, so chunking must not change which
    # gradients are clipped together. No noise, so the runs are comparable.
    dp = DPConfig(enabled=dp_enabled, max_grad_norm=0.05, noise_multiplier=0.0,
                  target_epsilon=None)
    results, adapters = [], []
    for chunk_tokens in (0, 40):
        set_adapter(model, start)
        train = TrainConfig(batch_size=24, lr=0.5, optimizer="sgd", chunk_tokens=chunk_tokens)
        results.append(train_local(model, data, task="classification", pad_id=tok.pad_token_id,
                                   device=torch.device("cpu"), train=train, dp=dp,
                                   noise_multiplier=0.0, steps=3, seed=7))
        adapters.append(get_adapter(model))
    set_adapter(model, start)
    whole, chunked = results
    assert chunked.examples_seen == whole.examples_seen > 0
    assert chunked.mean_loss == pytest.approx(whole.mean_loss, rel=1e-5)
    moved = max(float(np.abs(a - s).max()) for a, s in zip(adapters[0], start, strict=True))
    assert moved > 1e-4  # the comparison is about a real update
    for a, b in zip(*adapters, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
