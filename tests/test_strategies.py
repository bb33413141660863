"""Federated LoRA methods: FedProx, FedAdam, FedYogi, FFA-LoRA, product aggregation.

Everything runs the real stack: Flower's strategies, Opacus, PEFT and the embedded MiniLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdam as FlowerFedAdam
from flwr.server.strategy import FedYogi as FlowerFedYogi
from safetensors.numpy import load_file

from fedtune.client.client_app import FedtuneClient, SiteSpec
from fedtune.common.config import STRATEGY_NAMES, ConfigError, RunConfig, load_config
from fedtune.common.data import write_jsonl
from fedtune.common.demo_data import classification_demo
from fedtune.common.lora import get_adapter, lora_a_digest, trainable_names
from fedtune.common.model_cache import get_runtime
from fedtune.server.strategy import (
    STRATEGIES,
    FedAdam,
    FedAvgM,
    FedProx,
    FedYogi,
    FfaLora,
    ProductSvd,
)
from fedtune.server.strategy.product_svd import aggregate_products, lora_pairs
from tests.conftest import FAST, run_fedtune, sets

MINILM = ["model.name=all-minilm-l6-v2", "model.max_length=32", "lora.r=4"]


def _reply(arrays, n, **metrics):
    return (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics))


def _rng_adapter(rng, shapes):
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


# ------------------------------------------------------------------ config


def test_wrong_strategy_name_is_a_clear_error_listing_the_choices():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["federation.strategy=fedsgd"])
    msg = str(err.value)
    assert "federation.strategy" in msg and "'fedsgd'" in msg
    for name in STRATEGY_NAMES:
        assert name in msg
    # the config's choices and the registry agree: every name is runnable
    assert set(STRATEGY_NAMES) == set(STRATEGIES)


@pytest.mark.parametrize("override, key", [
    ("federation.proximal_mu=-0.1", "federation.proximal_mu"),
    ("federation.server_lr=0", "federation.server_lr"),
    ("federation.server_beta1=1.0", "federation.server_beta1"),
    ("federation.server_momentum=1.0", "federation.server_momentum"),
    ("federation.server_tau=0", "federation.server_tau"),
])
def test_strategy_knobs_are_validated(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_product_aggregation_refuses_secagg():
    with pytest.raises(ConfigError, match="product_svd.*SecAgg"):
        load_config(None, ["federation.strategy=product_svd", "federation.secagg=true"])
    assert load_config(None, ["federation.strategy=ffa_lora", "federation.secagg=true"])


# ------------------------------------------------------------------ FedAdam / FedYogi


@pytest.mark.parametrize("ours, flowers", [(FedAdam, FlowerFedAdam), (FedYogi, FlowerFedYogi)])
def test_server_optimizers_on_deltas_match_flower_on_weights(ours, flowers):
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (2, 4), (5,)]
    g = _rng_adapter(rng, shapes)
    kw = {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    cfg = load_config(None, ["federation.server_lr=0.05", "federation.server_tau=1e-3"])
    assert {k: v for k, v in ours.config_kwargs(cfg, torch.nn.Linear(1, 1)).items()
            if k in kw} == kw
    mine = ours(initial_parameters=ndarrays_to_parameters(g), **kw)
    mine.initialize_parameters(client_manager=None)
    ref = flowers(initial_parameters=ndarrays_to_parameters(g), **kw)
    ref_global = g
    for rnd in (1, 2, 3):
        deltas = [_rng_adapter(rng, shapes) for _ in range(3)]
        counts = [10, 30, 60]
        replies = [_reply(d, n) for d, n in zip(deltas, counts, strict=True)]
        got = parameters_to_ndarrays(mine.aggregate_fit(rnd, replies, [])[0])
        weights = [[a + b for a, b in zip(ref_global, d, strict=True)] for d in deltas]
        full = [_reply(w, n) for w, n in zip(weights, counts, strict=True)]
        want = parameters_to_ndarrays(ref.aggregate_fit(rnd, full, [])[0])
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        if rnd == 1 and ours is FedAdam:
            # by hand (Reddi et al. Alg. 2 with Flower's bias-corrected step size)
            pairs = list(zip(deltas, counts, strict=True))
            mean = [sum(n * d[i] for d, n in pairs) / 100 for i in range(3)]
            eta_t = 0.05 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
            for i in range(3):
                m, v = 0.1 * mean[i], 0.01 * mean[i] ** 2
                np.testing.assert_allclose(got[i], g[i] + eta_t * m / (np.sqrt(v) + 1e-3),
                                           rtol=1e-5, atol=1e-6)
        ref_global = want
    np.testing.assert_allclose(mine.global_adapter[0], got[0])


def test_fedavgm_moves_the_adapter_by_the_momentum_buffer_of_mean_deltas():
    rng = np.random.default_rng(3)
    shapes = [(4, 3), (5,)]
    g = _rng_adapter(rng, shapes)
    cfg = load_config(None, ["federation.strategy=fedavgm", "federation.server_momentum=0.5"])
    kw = FedAvgM.config_kwargs(cfg, torch.nn.Linear(1, 1))
    assert kw == {"server_learning_rate": 1.0, "server_momentum": 0.5}  # lr default: 1
    # FedAdam's server step size keeps its own default when server_lr is unset
    assert FedAdam.config_kwargs(cfg, torch.nn.Linear(1, 1))["eta"] == 1e-2
    mine = FedAvgM(initial_parameters=ndarrays_to_parameters(g), **kw)
    mine.initialize_parameters(client_manager=None)
    want, buffer = [a.copy() for a in g], None
    for rnd in (1, 2, 3):
        deltas = [_rng_adapter(rng, shapes) for _ in range(2)]
        got = parameters_to_ndarrays(mine.aggregate_fit(
            rnd, [_reply(deltas[0], 10), _reply(deltas[1], 30)], [])[0])
        mean = [(10 * a + 30 * b) / 40 for a, b in zip(*deltas, strict=True)]
        buffer = mean if buffer is None else [0.5 * m + d for m, d in zip(buffer, mean,
                                                                          strict=True)]
        want = [w + m for w, m in zip(want, buffer, strict=True)]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mine.global_adapter[0], want[0], rtol=1e-5, atol=1e-6)


def test_fedavgm_starts_its_buffer_at_the_first_round_with_an_update():
    """Round 1 without updates (every site declined) must not stop the server in round 2."""
    rng = np.random.default_rng(4)
    g = _rng_adapter(rng, [(3, 2)])
    s = FedAvgM(initial_parameters=ndarrays_to_parameters(g), server_momentum=0.9)
    s.initialize_parameters(client_manager=None)
    assert s.aggregate_fit(1, [_reply([np.zeros((3, 2), np.float32)], 0)], []) == (None, {})
    delta = _rng_adapter(rng, [(3, 2)])
    got = parameters_to_ndarrays(s.aggregate_fit(2, [_reply(delta, 5)], [])[0])
    np.testing.assert_allclose(got[0], g[0] + delta[0], rtol=1e-6)  # buffer = first mean delta
    delta2 = _rng_adapter(rng, [(3, 2)])
    got2 = parameters_to_ndarrays(s.aggregate_fit(3, [_reply(delta2, 5)], [])[0])
    np.testing.assert_allclose(got2[0], got[0] + 0.9 * delta[0] + delta2[0], rtol=1e-5,
                               atol=1e-6)


# ------------------------------------------------------------------ product aggregation


def _factors(rng, k, d_out, d_in, r, used_rank=None):
    out = []
    for _ in range(k):
        b = rng.normal(size=(d_out, r))
        if used_rank is not None:
            b[:, used_rank:] = 0.0
        out.append((b, rng.normal(size=(r, d_in))))
    return out


def test_product_aggregation_is_exact_when_the_rank_allows():
    rng = np.random.default_rng(1)
    r = 4
    factors = _factors(rng, 2, 12, 9, r, used_rank=2)  # two rank-2 products: the sum has rank 4
    w = [3.0, 1.0]
    b, a, err = aggregate_products(factors, w, r)
    mean = (3 * factors[0][0] @ factors[0][1] + factors[1][0] @ factors[1][1]) / 4
    np.testing.assert_allclose(b @ a, mean, atol=1e-10)
    assert err < 1e-7
    np.testing.assert_allclose(a @ a.T, np.eye(r), atol=1e-10)  # A: orthonormal rows
    # not what averaging the factors gives
    naive = ((3 * factors[0][0] + factors[1][0]) / 4) @ ((3 * factors[0][1] + factors[1][1]) / 4)
    assert np.linalg.norm(naive - mean) > 0.1 * np.linalg.norm(mean)


def test_product_aggregation_truncation_error_is_the_svd_tail():
    rng = np.random.default_rng(2)
    r = 3
    factors = _factors(rng, 4, 20, 15, r)  # rank 12 > r: truncation needed
    w = [5.0, 1.0, 2.0, 2.0]
    b, a, err = aggregate_products(factors, w, r)
    mean = sum(wk * bk @ ak for wk, (bk, ak) in zip(w, factors, strict=True)) / sum(w)
    s = np.linalg.svd(mean, compute_uv=False)
    tail = np.sqrt(np.sum(s[r:] ** 2))
    # Eckart-Young: the best rank-r approximation, and the error it reports
    np.testing.assert_allclose(np.linalg.norm(mean - b @ a), tail, rtol=1e-8)
    np.testing.assert_allclose(err, tail / np.linalg.norm(mean), rtol=1e-8)
    assert err > 0.05


def test_product_strategy_on_deltas_and_names():
    rng = np.random.default_rng(3)
    names = ["m.q.lora_A.default.weight", "m.q.lora_B.default.weight", "head.weight"]
    shapes = [(2, 6), (5, 2), (3, 5)]
    g = _rng_adapter(rng, shapes)
    assert lora_pairs(names) == [(0, 1)]
    strategy = ProductSvd(initial_parameters=ndarrays_to_parameters(g), param_names=names)
    strategy.initialize_parameters(client_manager=None)
    shared_a = rng.normal(size=(2, 6)).astype(np.float32)
    sites = []
    for _ in range(3):
        site = _rng_adapter(rng, shapes)
        site[0] = shared_a  # sites agree on A: the mean product is rank 2, so exact
        sites.append(site)
    counts = [1, 2, 7]
    deltas = [[s - gg for s, gg in zip(site, g, strict=True)] for site in sites]
    replies = [_reply(d, n) for d, n in zip(deltas, counts, strict=True)]
    params, metrics = strategy.aggregate_fit(1, replies, [])
    a, b, head = parameters_to_ndarrays(params)
    want = sum(n * s[1] @ s[0] for s, n in zip(sites, counts, strict=True)) / 10
    np.testing.assert_allclose(b @ a, want, rtol=1e-4, atol=1e-5)
    head_mean = sum(n * s[2] for s, n in zip(sites, counts, strict=True)) / 10
    np.testing.assert_allclose(head, head_mean, rtol=1e-5)
    assert metrics["svd_truncation_error"] < 1e-5
    with pytest.raises(ValueError, match="no B partner"):
        lora_pairs(["x.lora_A.default.weight"])


# ------------------------------------------------------------------ real model: FedProx, FFA


def _cls_config(tmp_path: Path, *extra: str) -> RunConfig:
    # A random head: these tests measure how far local training moves the adapter, which a
    # zero-shot (label-name) head, already near the demo's answer, would barely do.
    cfg = load_config(None, [*MINILM, "dp.enabled=false", "train.batch_size=4",
                             "train.lr=0.05", "task.head_init=random", *extra])
    labels = sorted({r["label"] for r in classification_demo(40, 0)})
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": labels})})


def _site(tmp_path: Path, name: str = "site-0") -> SiteSpec:
    path = tmp_path / name / "train.jsonl"
    write_jsonl(path, classification_demo(40, 0))
    return SiteSpec(name, path, tmp_path / name / "state")


def _fit(cfg: RunConfig, spec: SiteSpec, params, **extra):
    config = {"run_id": "t", "server_round": 1, "num_rounds": 1, "local_steps": 6, **extra}
    return FedtuneClient(spec, cfg).fit(params, config)


def _norm(arrays) -> float:
    return float(np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays)))


@pytest.mark.parametrize("dp", [False, True])
def test_fedprox_pulls_local_training_toward_the_global_adapter(tmp_path, dp):
    cfg = _cls_config(tmp_path, f"dp.enabled={str(dp).lower()}", "dp.delta=1e-3",
                      "dp.target_epsilon=50", "train.optimizer=sgd", "train.lr=0.5",
                      # both fits draw the same batches and noise: only the pull differs
                      "dp.reproducible_seed=true")
    rt = get_runtime(cfg, "classification", len(cfg.data.labels))
    g = get_adapter(rt.model)
    free, n, _ = _fit(cfg, _site(tmp_path / "a"), g)
    assert n == 40
    pulled, _, _ = _fit(cfg, _site(tmp_path / "b"), g, proximal_mu=1.6)  # lr * mu = 0.8
    assert _norm(pulled) < 0.6 * _norm(free)
    assert FedProx.config_kwargs(load_config(None, ["federation.proximal_mu=0.3"]),
                                 rt.model) == {"proximal_mu": 0.3}


def test_ffa_lora_trains_and_sends_only_b_and_keeps_a(tmp_path):
    ffa = _cls_config(tmp_path, "federation.strategy=ffa_lora")
    avg = _cls_config(tmp_path)
    rt = get_runtime(ffa, "classification", len(ffa.data.labels))
    names = trainable_names(rt.model)
    lora_b = [n for n in names if ".lora_B." in n]
    assert lora_b and not any(".lora_A." in n for n in names)
    # B starts at zero, so the initial adapter is the base model
    params = get_adapter(rt.model)
    for name, arr in zip(names, params, strict=True):
        if ".lora_B." in name:
            assert not arr.any()
    # upload: B only, half of LoRA's A+B for these square (384 x 384) layers
    full = get_runtime(avg, "classification", len(avg.data.labels)).model
    lora_full = sum(p.numel() for n, p in full.named_parameters() if p.requires_grad
                    and ".lora_" in n)
    lora_ffa = sum(a.size for n, a in zip(names, params, strict=True) if ".lora_" in n)
    assert lora_ffa * 2 == lora_full
    # A is the same wherever it is built: a second, independent load (other global RNG state)
    before = lora_a_digest(rt.model)
    torch.manual_seed(1234)
    from fedtune.common.lora import apply_lora
    from fedtune.common.models import load_base_model
    base, _, _ = load_base_model("all-minilm-l6-v2", "classification",
                                 num_labels=len(ffa.data.labels))
    other = apply_lora(base, "classification", ffa.lora, freeze_a=True)
    assert lora_a_digest(other) == before
    # a site trains: B moves, A does not, and the site reports its A digest
    delta, n, metrics = _fit(ffa, _site(tmp_path), params)
    assert len(delta) == len(names) and n == 40
    moved = [np.abs(d).max() for nm, d in zip(names, delta, strict=True) if ".lora_B." in nm]
    assert max(moved) > 0
    assert lora_a_digest(rt.model) == before == metrics["lora_a_digest"]
    # the server keeps updates from sites with its A and drops the others
    kw = FfaLora.config_kwargs(ffa, rt.model)
    assert kw == {"lora_a_digest": before}
    strategy = FfaLora(initial_parameters=ndarrays_to_parameters(params), **kw)
    strategy.initialize_parameters(client_manager=None)
    bad = [np.full_like(d, 100.0) for d in delta]
    out, _ = strategy.aggregate_fit(1, [_reply(delta, 40, lora_a_digest=before),
                                        _reply(bad, 40, lora_a_digest="deadbeef")], [])
    for got, p, d in zip(parameters_to_ndarrays(out), params, delta, strict=True):
        np.testing.assert_allclose(got, p + d, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="frozen"):
        FfaLora.config_kwargs(avg, full)


# ------------------------------------------------------------------ real simulation


@pytest.mark.slow
def test_ffa_lora_simulation_minilm(tmp_path: Path):
    res = run_fedtune("simulate", *sets(*FAST, f"output.dir={tmp_path}", "output.run_name=ffa",
                                        "model.name=all-minilm-l6-v2", "federation.num_sites=2",
                                        "federation.rounds=2", "federation.strategy=ffa_lora",
                                        "federation.parallel_sites=1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "ffa"
    rounds = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in rounds] == [0, 1, 2]
    digests = {s["lora_a_digest"] for m in rounds[1:] for s in m["sites"]}
    assert len(digests) == 1 and all(s["status"] == "ok" for s in rounds[1]["sites"])
    # the saved adapter (PEFT format) holds the seeded A, untouched, and a trained B
    cfg = load_config(run / "config.toml")
    rt = get_runtime(cfg, "classification", len(cfg.data.labels))
    assert lora_a_digest(rt.model) in digests
    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    ref = {n: p.detach().numpy() for n, p in rt.model.named_parameters() if ".lora_A." in n}
    a_keys = [k for k in saved if ".lora_A." in k]
    assert len(a_keys) == len(ref) > 0
    for key in a_keys:
        match = [v for n, v in ref.items() if n.replace(".default", "") == key]
        np.testing.assert_array_equal(saved[key], match[0])
    assert any(np.abs(v).max() > 0 for k, v in saved.items() if ".lora_B." in k)


@pytest.mark.slow
def test_fedavgm_simulation_saves_its_momentum_buffer(tmp_path: Path):
    """FedAvgM end to end (real Flower simulation, DP-SGD at the sites): the buffer that the
    next round needs is in the server's saved state, one array per adapter tensor. Also the
    server's evaluation every k rounds (federation.evaluate_every)."""
    from fedtune.server.state import load_state

    res = run_fedtune("simulate", *sets(*FAST, f"output.dir={tmp_path}", "output.run_name=m",
                                        "model.name=all-minilm-l6-v2", "federation.num_sites=2",
                                        "federation.rounds=3", "federation.strategy=fedavgm",
                                        "federation.server_momentum=0.5",
                                        "federation.evaluate_every=2",
                                        "federation.parallel_sites=1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "m"
    rounds = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in rounds] == [0, 1, 2, 3]
    assert all(s["status"] == "ok" and s["epsilon"] > 0 for s in rounds[3]["sites"])
    # evaluated before training, every 2nd round and after the last; round 1 still recorded
    assert ["accuracy" in m.get("eval", {}) for m in rounds] == [True, False, True, True]
    assert rounds[1]["train_loss"] > 0 and len(rounds[1]["sites"]) == 2
    assert "round 1: train loss" in res.stdout and "not evaluated this round" in res.stdout
    state = load_state(run)
    assert state is not None and state.round == 3
    buffer = state.strategy["momentum_vector"]
    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert len(buffer) == len(saved) and all(np.abs(b).max() > 0 for b in buffer)
