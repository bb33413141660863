"""Site-level central DP: Flower's real DifferentialPrivacy*Clipping wrappers around fedtune's
delta aggregation. The composition must clip the sites' *updates* (deltas), weigh sites equally,
add Flower's noise, and account every released aggregate."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from fedtune.client.central_clip import clip_delta_if_asked
from fedtune.common.config import ConfigError, RunConfig, load_config
from fedtune.server.strategy.central_dp import with_central_dp
from fedtune.server.strategy.fedavg import FedAvg

# Large weights, small updates: clipping the weights instead of the updates would be obvious.
GLOBAL = [np.full(400, 10.0, dtype=np.float64), np.full((20, 30), -5.0, dtype=np.float64)]


def _cfg(**central) -> RunConfig:
    return load_config(None, ["federation.num_sites=3", "central_dp.enabled=true",
                              *(f"central_dp.{k}={v!r}".replace("'", '"')
                                for k, v in central.items())])


def _delta(seed: int, norm: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    d = [rng.normal(size=g.shape) for g in GLOBAL]
    scale = norm / math.sqrt(sum(float(np.sum(x * x)) for x in d))
    return [x * scale for x in d]


def _clip(delta: list[np.ndarray], c: float) -> list[np.ndarray]:
    norm = math.sqrt(sum(float(np.sum(x * x)) for x in delta))
    return [x * min(1.0, c / norm) for x in delta]


def _res(delta: list[np.ndarray], examples: int, metrics: dict | None = None) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(delta), examples, metrics or {})


class _Run:
    """A wrapped strategy driven through one Flower round (configure_fit, aggregate_fit)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.released: list[dict] = []
        self.checkpoints: list = []
        inner = FedAvg(
            fraction_fit=1.0, min_fit_clients=1, min_available_clients=3,
            fraction_evaluate=0.0, min_evaluate_clients=0, accept_failures=True,
            initial_parameters=ndarrays_to_parameters(GLOBAL),
            after_aggregate=lambda r, adapter, sites: self.checkpoints.append(adapter),
        )
        self.strategy = with_central_dp(inner, cfg, on_release=lambda r, i: self.released.append(i))
        self.manager = SimpleClientManager()
        self.proxies = [GridClientProxy(k, None, 0) for k in range(3)]  # never called
        for p in self.proxies:
            self.manager.register(p)
        self.params = self.strategy.initialize_parameters(self.manager)

    def round(self, rnd: int, replies: list[FitRes]) -> tuple[list[dict], list[np.ndarray]]:
        ins = self.strategy.configure_fit(rnd, self.params, self.manager)
        configs = [fit_ins.config for _, fit_ins in ins]
        results = list(zip([p for p, _ in ins], replies, strict=True))
        self.params, _ = self.strategy.aggregate_fit(rnd, results, [])
        return configs, parameters_to_ndarrays(self.params)


def test_server_side_fixed_clips_updates_weighs_sites_equally_and_accounts():
    c = 0.5
    run = _Run(_cfg(side="server", clipping="fixed", clipping_norm=c, noise_multiplier=1e-9))
    big, small = _delta(1, norm=3.0), _delta(2, norm=0.2)
    zero = [np.zeros_like(g) for g in GLOBAL]
    # Site 3 declined (budget exhausted): zero examples, dropped before the DP wrapper.
    configs, new = run.round(1, [_res(big, 1000), _res(small, 10),
                                 _res(zero, 0, {"status": "budget_exhausted"})])
    assert all(KEY_CLIPPING_NORM not in cfg for cfg in configs)  # server-side: sites don't clip
    expected = [g + (a + b) / 2 for g, a, b in zip(GLOBAL, _clip(big, c), small, strict=True)]
    for got, want in zip(new, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)  # equal weights despite 1000 vs 10
    np.testing.assert_allclose(run.checkpoints[-1][0], new[0])  # the checkpoint is the release
    (info,) = run.released
    assert info["sites_aggregated"] == 2 and info["sites_sampled"] == 3
    # Noise std z C / 3 on a mean over 2 sites: effective noise multiplier z * 2 / 3.
    assert info["noise_multiplier_effective"] == pytest.approx(1e-9 * 2 / 3)


def test_noise_has_flowers_std_and_epsilon_matches_google_dp_accounting():
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting import rdp

    c, z = 0.5, 1.2
    run = _Run(_cfg(side="server", clipping="fixed", clipping_norm=c, noise_multiplier=z,
                    delta=1e-3))
    deltas = [_delta(k, norm=0.1) for k in range(3)]
    for rnd in (1, 2, 3):
        before = parameters_to_ndarrays(run.params)
        _, new = run.round(rnd, [_res(d, 50) for d in deltas])
        noise = np.concatenate([
            (n - b - sum(d[i] for d in deltas) / 3).ravel()
            for i, (n, b) in enumerate(zip(new, before, strict=True))
        ])
        assert np.std(noise) == pytest.approx(z * c / 3, rel=0.1)  # Flower's z C / n
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(z), 3)  # no sampling amplification claimed
    last = run.released[-1]
    assert last["releases"] == 3 and last["noise_multiplier_effective"] == pytest.approx(z)
    assert last["epsilon_rdp"] == pytest.approx(acc.get_epsilon(1e-3), rel=0.01)
    assert last["epsilon_prv"] <= last["epsilon_rdp"] * 1.01


def test_client_side_fixed_sites_clip_their_own_delta():
    c = 0.3
    run = _Run(_cfg(side="client", clipping="fixed", clipping_norm=c, noise_multiplier=1e-9))
    ins = run.strategy.configure_fit(1, run.params, run.manager)
    config = ins[0][1].config
    assert config[KEY_CLIPPING_NORM] == c  # sent by Flower's client-side wrapper
    raw = [_delta(k, norm=n) for k, n in enumerate((2.0, 0.1, 1.0))]
    sent = [[x.copy() for x in d] for d in raw]
    bits = [clip_delta_if_asked(d, config)[KEY_NORM_BIT] for d in sent]  # what each site does
    assert bits == [True, False, True]
    for d in sent:
        assert math.sqrt(sum(float(np.sum(x * x)) for x in d)) <= c * (1 + 1e-9)
    results = list(zip([p for p, _ in ins], [_res(d, 5) for d in sent], strict=True))
    params, _ = run.strategy.aggregate_fit(1, results, [])
    got = parameters_to_ndarrays(params)
    want = [g + sum(_clip(d, c)[i] for d in raw) / 3 for i, g in enumerate(GLOBAL)]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_adaptive_clipping_moves_the_norm_and_accounts_the_combined_noise():
    run = _Run(_cfg(side="server", clipping="adaptive", clipping_norm=0.1, noise_multiplier=0.8,
                    clipped_count_stddev=2.0))
    for rnd in (1, 2):
        run.round(rnd, [_res(_delta(k, norm=5.0), 20) for k in range(3)])
    first, second = run.released
    # The report shows the norm each round used; Flower adapted it after round 1. (Flower 1.39
    # moves it by -lr * (clipped fraction - target), see docs/privacy.md: here it shrinks.)
    assert first["clipping_norm"] == 0.1 and second["clipping_norm"] != 0.1
    # Flower splits z = 0.8 into update noise z_u (z^-2 = z_u^-2 + (2 * 2.0)^-2); the accountant
    # composes z_u with the clipped-count noise 2.0 at sensitivity 1 (a site changes the count
    # by at most 1): conservative, below the configured z.
    z_u = (0.8**-2 - 4.0**-2) ** -0.5
    assert second["noise_multiplier"] == pytest.approx(z_u)
    assert second["noise_multiplier_effective"] == pytest.approx((z_u**-2 + 2.0**-2) ** -0.5)
    assert second["noise_multiplier_effective"] < 0.8


def test_config_refuses_combinations_that_would_void_the_guarantee():
    with pytest.raises(ConfigError, match="SecAgg"):
        load_config(None, ["central_dp.enabled=true", "federation.secagg=true"])
    with pytest.raises(ConfigError, match="mean of the site updates"):
        load_config(None, ["central_dp.enabled=true", 'federation.strategy="fedadam"'])
    with pytest.raises(ConfigError, match="below 1/num_sites"):
        load_config(None, ["central_dp.enabled=true", "central_dp.delta=0.5"])
    # Client-side clipping works with SecAgg+ (the server only needs the sum).
    load_config(None, ["central_dp.enabled=true", 'central_dp.side="client"',
                       "federation.secagg=true"])
