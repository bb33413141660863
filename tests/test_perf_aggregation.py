"""Streaming aggregation equals Flower's FedAvg and holds O(1) updates; the site-data cache is
bounded. Correctness and memory bounds only; no timing."""

from __future__ import annotations

import tracemalloc

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy.aggregate import aggregate

from fedtune.client import client_app
from fedtune.client.client_app import SiteSpec, load_site_dataset
from fedtune.common.config import load_config
from fedtune.common.data import write_jsonl
from fedtune.common.model_cache import get_runtime
from fedtune.server.aggregation import WeightedDeltaSum, streaming_mean
from fedtune.server.strategy import FedAvg, FedProx, FfaLora
from fedtune.server.strategy.delta import DeltaAggregation


def _updates(n: int, shapes: list[tuple[int, ...]], seed: int = 0):
    rng = np.random.default_rng(seed)
    for k in range(n):  # float32 drawn directly: no float64 temporaries
        yield [rng.standard_normal(s, dtype=np.float32) for s in shapes], float(k % 7 + 1)


def test_streaming_mean_equals_flower_fedavg() -> None:
    shapes = [(16, 64), (64, 16), (5,)]
    g = [np.full(s, 0.25, np.float32) for s in shapes]
    ups = list(_updates(25, shapes))
    got, count = streaming_mean(g, (([a.copy() for a in d], w) for d, w in ups))
    flower = aggregate([([gi + di for gi, di in zip(g, d, strict=True)], int(w)) for d, w in ups])
    assert count == 25
    for a, b in zip(got, flower, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # Inputs it does not own are left untouched.
    d0 = [a.copy() for a in ups[0][0]]
    acc = WeightedDeltaSum()
    acc.add(ups[0][0], 3.0)
    for a, b in zip(d0, ups[0][0], strict=True):
        np.testing.assert_array_equal(a, b)


def test_streaming_peak_memory_is_bounded_by_a_few_updates() -> None:
    shapes = [(256, 1024), (1024, 256)]  # 2 MiB per update
    one = sum(int(np.prod(s)) * 4 for s in shapes)
    g = [np.zeros(s, np.float32) for s in shapes]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        streaming_mean(g, _updates(40, shapes))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak <= 3 * one, f"peak {peak / one:.2f} updates"


def test_delta_strategies_that_average_stream() -> None:
    assert FedAvg()._streams_mean() and FedProx(proximal_mu=0.1)._streams_mean()
    assert FfaLora()._streams_mean()  # filters A digests, then FedAvg's mean
    from fedtune.server.strategy import FedAdam, ProductSvd

    assert not FedAdam(initial_parameters=ndarrays_to_parameters([np.zeros(1)]))._streams_mean()
    assert not ProductSvd(param_names=["x.lora_A.w", "x.lora_B.w"])._streams_mean()
    assert issubclass(FedAvg, DeltaAggregation)


def test_streaming_fedavg_reply_matches_flower_path() -> None:
    g = [np.ones((4, 3), np.float32)]
    d = [[np.full((4, 3), v, np.float32)] for v in (1.0, -3.0, 0.5)]
    replies = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(x), n, {}))
               for x, n in zip(d, (1, 2, 4), strict=True)]
    s = FedAvg(initial_parameters=ndarrays_to_parameters(g),
               fit_metrics_aggregation_fn=lambda m: {"n": sum(k for k, _ in m)})
    s.initialize_parameters(client_manager=None)
    params, metrics = s.aggregate_fit(1, replies, [])
    expected = 1.0 + (1 * 1.0 + 2 * -3.0 + 4 * 0.5) / 7
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], expected, rtol=1e-6)
    np.testing.assert_allclose(s.global_adapter[0], expected, rtol=1e-6)
    assert metrics == {"n": 7}


def test_site_dataset_cache_is_bounded(tmp_path) -> None:
    cfg = load_config(overrides=["model.name=all-minilm-l6-v2", 'data.labels=["a", "b"]'])
    rt = get_runtime(cfg, "classification", 2)
    client_app._DATA_CACHE.clear()
    sites = []
    for k in range(client_app.DATA_CACHE_SIZE + 5):
        path = tmp_path / f"site-{k}" / "train.jsonl"
        write_jsonl(path, [{"text": f"site {k} record {i}", "label": "ab"[i % 2]}
                           for i in range(3)])
        sites.append(SiteSpec(f"site-{k}", path, tmp_path / f"site-{k}" / "state"))
        assert len(load_site_dataset(sites[-1], cfg, rt)) == 3
        assert len(client_app._DATA_CACHE) <= client_app.DATA_CACHE_SIZE
    # The most recent site is served from the cache (the very same object).
    assert load_site_dataset(sites[-1], cfg, rt) is load_site_dataset(sites[-1], cfg, rt)


def test_fedavg_streaming_path_keeps_no_reply() -> None:
    """fedtune's FedAvg aggregates replies produced one at a time without keeping any."""
    shapes = [(256, 1024), (1024, 256)]
    one = sum(int(np.prod(s)) * 4 for s in shapes)
    s = FedAvg(initial_parameters=ndarrays_to_parameters([np.zeros(x, np.float32)
                                                          for x in shapes]))
    s.initialize_parameters(client_manager=None)

    # One serialised payload, made before tracing and shared by every reply: what is measured
    # is what the aggregation allocates, not the cost of making replies.
    payload = ndarrays_to_parameters(next(_updates(1, shapes))[0])

    def replies():
        for k in range(30):
            yield None, FitRes(Status(Code.OK, ""), payload, k % 7 + 1, {})

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        params, _, _ = s._streaming_fedavg(1, replies(), [])
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert params is not None
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0],
                               parameters_to_ndarrays(payload)[0], rtol=1e-5, atol=1e-6)
    # a decoded reply + the accumulator + the serialised result
    assert peak <= 3 * one, f"peak {peak / one:.2f} updates"
