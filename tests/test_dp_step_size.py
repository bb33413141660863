"""The benchmark's DP step-size proxy (benchmarks/dp_step_size.py): it must score the model's
own head, and its DP-SGD must behave like DP-SGD (noise hurts, more budget helps)."""

import numpy as np
import pytest
import torch

from benchmarks.dp_step_size import (
    Features,
    Head,
    choose_lr,
    dp_fedavg_head,
    head_of,
    sentence_features,
)
from fedtune.common.config import load_config
from fedtune.common.data import EncodedDataset, PadCollator
from fedtune.common.model_cache import get_runtime

LABELS = ["card arrival", "exchange rate", "lost or stolen card", "top up failed"]
QUERIES = [("when will my new card arrive", 0), ("what rate do you use for euros", 1),
           ("someone stole my card", 2), ("my top up did not go through", 3),
           ("card still not delivered", 0), ("how is the exchange rate set", 1)]


def test_the_proxy_head_scores_like_the_model():
    cfg = load_config(None, ["model.name=all-minilm-l6-v2", f"data.labels={LABELS}",
                             "task.head_init=label_names"])
    rt = get_runtime(cfg, "classification", len(LABELS))
    data = EncodedDataset([{"input_ids": rt.tokenizer(q)["input_ids"], "labels": y}
                           for q, y in QUERIES])
    features = sentence_features(rt.model, data, rt.pad_id)
    head = head_of(rt.model)
    assert head.scale == 20.0 and features.x.shape == (6, 384)
    batch = PadCollator(rt.pad_id)([data[i] for i in range(len(data))])
    rt.model.eval()
    with torch.no_grad():
        logits = rt.model(input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"]).logits
    proxy = head.scale * (features.x @ head.weight.T + head.bias)
    torch.testing.assert_close(proxy, logits.float(), rtol=1e-4, atol=1e-4)
    assert head.accuracy(features) == float((logits.argmax(1) == batch["labels"]).float().mean())


def _blobs(n: int, seed: int, k: int = 4, dim: int = 16) -> Features:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(k, dim, generator=torch.Generator()
                                                        .manual_seed(99)), dim=1)
    y = torch.randint(0, k, (n,), generator=gen)
    x = torch.nn.functional.normalize(centers[y] + 0.3 * torch.randn(n, dim, generator=gen),
                                      dim=1)
    return Features(x, y)


@pytest.fixture(scope="module")
def federation():
    banks = [_blobs(300, s) for s in range(3)]
    head = Head(torch.zeros(4, 16), torch.zeros(4), 20.0)
    return head, banks, _blobs(400, 10)


RUN = {"rounds": 3, "local_steps": 5, "batch_size": 64, "delta": 1e-4, "clip": 1.0}


def test_dp_training_learns_and_noise_costs_accuracy(federation):
    head, banks, validation = federation
    assert head.accuracy(validation) < 0.35  # all-zero head: one class
    loose = np.mean([dp_fedavg_head(head, banks, lr=1.0, epsilon=50.0, seed=s, **RUN)
                     .accuracy(validation) for s in range(3)])
    tight = np.mean([dp_fedavg_head(head, banks, lr=1.0, epsilon=0.3, seed=s, **RUN)
                     .accuracy(validation) for s in range(3)])
    assert loose > 0.9
    assert tight < loose - 0.2
    # epsilon None: the same recipe with noise 0 (the benchmark's non-private reference)
    free = np.mean([dp_fedavg_head(head, banks, lr=1.0, epsilon=None, seed=s, **RUN)
                    .accuracy(validation) for s in range(3)])
    assert free > 0.9 and free > tight + 0.2


def test_choose_lr_returns_the_best_mean_score(federation):
    head, banks, validation = federation
    lr, scores = choose_lr(head, banks, validation, candidates=[1e-4, 1.0], seeds=2,
                           epsilon=50.0, **RUN)
    assert set(scores) == {1e-4, 1.0}
    assert lr == max(scores, key=scores.get) == 1.0  # 1e-4 barely leaves the start


def test_server_momentum_is_fedavg_in_round_one_and_carries_over_after(federation):
    head, banks, validation = federation
    run = {**RUN, "lr": 0.3, "epsilon": 8.0, "seed": 0}
    one = {**run, "rounds": 1}
    plain = dp_fedavg_head(head, banks, **one)
    torch.testing.assert_close(dp_fedavg_head(head, banks, server_momentum=0.9, **one).weight,
                               plain.weight)  # the buffer starts as the first mean delta
    moved = dp_fedavg_head(head, banks, server_momentum=0.9, **run)
    assert not torch.allclose(moved.weight, dp_fedavg_head(head, banks, **run).weight)
    # with the sites' step size x (1 - momentum) it still learns
    slow = {**run, "lr": 0.3 * (1 - 0.9)}
    assert dp_fedavg_head(head, banks, server_momentum=0.9, **slow).accuracy(validation) > 0.8
