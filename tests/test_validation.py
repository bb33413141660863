"""Server-side validation of site updates (server/validation.py), driven through fedtune's real
Flower strategy objects (`aggregate_fit` of FedAvg/FedAdam over deltas, Flower's DP wrapper,
the SecAgg+ reply shape): a bad update is rejected and logged with the site id and the reason,
and the round goes on with the others."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAdam as FlowerFedAdam
from flwr.supercore.logger import FLOWER_LOGGER

from fedtune.common.codec import METRIC_KEY, encode
from fedtune.common.config import load_config
from fedtune.common.lora import LAYOUT_METRIC
from fedtune.server.strategy import FedAdam, FedAvg
from fedtune.server.strategy.central_dp import with_central_dp
from fedtune.server.validation import UpdateChecks, check_values, validate_update

GLOBAL = [np.full((4, 3), 0.5, np.float32), np.zeros(5, np.float32)]
SHAPES = tuple(g.shape for g in GLOBAL)
LAYOUT = "0badcafe"


def _delta(v: float) -> list[np.ndarray]:
    return [np.full(g.shape, v, np.float32) for g in GLOBAL]


def _reply(site: str, arrays: list[np.ndarray], n: int = 10, **metrics) -> tuple:
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n,
                 {"site_id": site, LAYOUT_METRIC: LAYOUT, **metrics})
    return GridClientProxy(hash(site) % 1000, None, 0), res  # never called


@pytest.fixture
def flwr_log():
    """Flower's log lines (its logger does not propagate to pytest's caplog)."""
    lines: list[str] = []

    class H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    h = H(level=logging.ERROR)
    FLOWER_LOGGER.addHandler(h)
    yield lines
    FLOWER_LOGGER.removeHandler(h)


def _strategy(cls=FedAvg, *, max_norm: float | None = 10.0, secagg: bool = False,
              min_fit: int = 1, **kw):
    info: list[dict] = []
    s = cls(initial_parameters=ndarrays_to_parameters(GLOBAL), min_fit_clients=min_fit,
            accept_failures=True, **kw)
    s.update_checks = UpdateChecks(max_norm=max_norm, layout=LAYOUT, secagg=secagg,
                                   min_updates=min_fit)
    s.on_round_info = lambda r, i: info.append(i)
    s.initialize_parameters(client_manager=None)
    return s, info


BAD = {
    "nan": ([np.full((4, 3), np.nan, np.float32), np.zeros(5, np.float32)], "NaN"),
    "inf": ([np.zeros((4, 3), np.float32), np.full(5, -np.inf, np.float32)], "Inf"),
    "shape": ([np.zeros((3, 4), np.float32), np.zeros(5, np.float32)], "shape (3, 4)"),
    "count": ([np.zeros((4, 3), np.float32)], "1 tensors"),
    "dtype": ([np.zeros((4, 3), np.int64), np.zeros(5, np.float32)], "dtype int64"),
    "norm": (_delta(100.0), "above federation.max_update_norm"),
}


def test_bad_updates_are_rejected_with_site_and_reason_and_the_round_goes_on(flwr_log):
    s, info = _strategy()
    good = [_reply("good-1", _delta(0.1), n=10), _reply("good-2", _delta(0.4), n=30)]
    bad = [_reply(f"bad-{k}", arrays) for k, (arrays, _) in BAD.items()]
    bad.append(_reply("bad-layout", _delta(0.2), **{LAYOUT_METRIC: "12345678"}))
    results = [bad[0], good[0], *bad[1:4], good[1], *bad[4:]]
    params, _ = s.aggregate_fit(1, results, [])

    expected = [g + (10 * 0.1 + 30 * 0.4) / 40 for g in GLOBAL]
    for got, want in zip(parameters_to_ndarrays(params), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    rejected = {r["site_id"]: r["reason"] for r in info[0]["rejected"]}
    assert set(rejected) == {*(f"bad-{k}" for k in BAD), "bad-layout"}
    for k, (_, reason) in BAD.items():
        assert reason in rejected[f"bad-{k}"]
        assert any(f"site bad-{k} rejected" in line and reason in line for line in flwr_log)
    assert "adapter layout 12345678" in rejected["bad-layout"]


def test_non_streaming_strategy_fedadam_sees_only_valid_updates():
    s, info = _strategy(FedAdam, eta=0.1, eta_l=0.1)
    ref = FlowerFedAdam(initial_parameters=ndarrays_to_parameters(GLOBAL), eta=0.1, eta_l=0.1)
    good = _delta(0.2)
    params, _ = s.aggregate_fit(1, [_reply("ok", good), _reply("bad", BAD["nan"][0])], [])
    weights = [g + d for g, d in zip(GLOBAL, good, strict=True)]
    ref_params, _ = ref.aggregate_fit(
        1, [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), 10, {}))], [])
    for a, b in zip(parameters_to_ndarrays(params), parameters_to_ndarrays(ref_params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert all(np.isfinite(m).all() for m in s.m_t)  # the optimizer state was not poisoned
    assert [r["site_id"] for r in info[0]["rejected"]] == ["bad"]


def test_fewer_valid_updates_than_min_fit_sites_leaves_the_adapter_unchanged(flwr_log):
    for cls in (FedAvg, FedAdam):  # streaming and non-streaming paths
        extra = {"eta": 0.1, "eta_l": 0.1} if cls is FedAdam else {}
        s, _ = _strategy(cls, min_fit=2, **extra)
        params, _ = s.aggregate_fit(1, [_reply("ok", _delta(0.1)),
                                        _reply("bad", BAD["inf"][0])], [])
        assert params is None
        for a, g in zip(s.global_adapter, GLOBAL, strict=True):
            np.testing.assert_array_equal(a, g)
        if cls is FedAdam:
            assert not s.m_t  # the optimizer never saw the void round
    assert any("fewer than federation.min_fit_sites = 2" in line for line in flwr_log)


def test_encoded_updates_are_validated_after_decoding():
    s, info = _strategy(max_norm=None)
    fp16_inf = encode([np.full((4, 3), np.inf, np.float32), np.zeros(5, np.float32)], "fp16")
    int8_ok = encode(_delta(0.3), "int8")
    params, _ = s.aggregate_fit(1, [_reply("inf16", fp16_inf, **{METRIC_KEY: "fp16"}),
                                    _reply("ok8", int8_ok, **{METRIC_KEY: "int8"})], [])
    assert params is not None and [r["site_id"] for r in info[0]["rejected"]] == ["inf16"]
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], 0.8, atol=0.01)


def _secagg_replies(aggregate: list[np.ndarray], sites: list[str], **metrics) -> list:
    """What Flower's SecAggPlusWorkflow hands the strategy: every reply carries the unmasked
    aggregate (one Parameters object), with each site's own metrics."""
    shared = ndarrays_to_parameters(aggregate)
    out = []
    for site in sites:
        proxy, res = _reply(site, aggregate, **metrics.get(site, {}))
        res.parameters = shared
        out.append((proxy, res))
    return out


def test_secagg_aggregate_is_validated_once_and_a_bad_sum_discards_the_round(flwr_log):
    sites = ["a", "b", "c"]
    s, info = _strategy(secagg=True, max_norm=1.0)
    params, _ = s.aggregate_fit(1, _secagg_replies(_delta(0.05), sites), [])
    assert params is not None and "rejected" not in info[-1]
    np.testing.assert_allclose(s.global_adapter[0], 0.55, rtol=1e-6)

    for aggregate, reason in ((BAD["nan"][0], "NaN"), (_delta(5.0), "max_update_norm")):
        before = [a.copy() for a in s.global_adapter]
        params, _ = s.aggregate_fit(2, _secagg_replies(aggregate, sites), [])
        assert params is None
        assert reason in info[-1]["rejected"][0]["reason"]
        assert "SecAgg+ aggregate" in info[-1]["rejected"][0]["reason"]
        for a, b in zip(s.global_adapter, before, strict=True):
            np.testing.assert_array_equal(a, b)
    assert any("cannot be removed from the sum" in line for line in flwr_log)

    # Per-site metadata is plain text under SecAgg+: a layout mismatch names the site.
    params, _ = s.aggregate_fit(3, _secagg_replies(_delta(0.05), sites,
                                                   b={LAYOUT_METRIC: "ffffffff"}), [])
    assert params is None and info[-1]["rejected"][0]["site_id"] == "b"


def test_nan_update_is_rejected_before_site_level_dp_clipping():
    cfg = load_config(None, ["federation.num_sites=3", "central_dp.enabled=true",
                             "central_dp.noise_multiplier=0.000001"])
    inner = FedAvg(initial_parameters=ndarrays_to_parameters(GLOBAL), min_fit_clients=1,
                   accept_failures=True)
    s = with_central_dp(inner, cfg)
    s.update_checks = UpdateChecks(layout=LAYOUT)
    manager = SimpleClientManager()
    for k in range(3):
        manager.register(GridClientProxy(k, None, 0))  # never called
    params = s.initialize_parameters(manager)
    proxies = [p for p, _ in s.configure_fit(1, params, manager)]
    replies = [_reply("ok", _delta(0.01)), _reply("ok2", _delta(0.01)),
               _reply("nan", BAD["nan"][0])]
    params, _ = s.aggregate_fit(1, [(p, r) for p, (_, r) in zip(proxies, replies, strict=True)],
                                [])
    out = parameters_to_ndarrays(params)
    assert all(np.isfinite(a).all() for a in out)
    np.testing.assert_allclose(out[0], 0.51, atol=1e-3)


def test_validation_helpers():
    checks = UpdateChecks(shapes=SHAPES, max_norm=1.0)
    delta, problem = validate_update(_delta(0.01), "fp32", {}, checks)
    assert problem is None and delta is not None
    assert check_values([np.float32([3.0, 4.0])], 5.0) is None
    assert "L2 norm 5" in check_values([np.float32([3.0, 4.0])], 4.9)
    # no bound: finite values only; the float64 sum does not overflow on large finite values
    assert check_values([np.full(10, 3e38, np.float32)], None) is None
    assert validate_update([np.zeros(3, np.float16)] * 2, "fp32", {}, checks)[1] is not None
