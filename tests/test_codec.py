"""Update encodings (fp16, int8): round trip, size, norm bound, config checks, server decoding."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedtune.common.codec import METRIC_KEY, CodecError, decode, encode
from fedtune.common.config import ConfigError, load_config
from fedtune.common.payload import payload_digest
from fedtune.server.strategy import FedAdam, FedAvg


def _delta(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # LoRA-like shapes and scales: A (r x d), B (d x r), a head; one tiny, one zero tensor.
    return [
        rng.normal(0, 3e-3, (8, 384)).astype(np.float32),
        rng.normal(0, 1e-3, (384, 8)).astype(np.float32),
        rng.normal(0, 2e-2, (77, 384)).astype(np.float32),
        rng.normal(0, 1e-7, (77,)).astype(np.float32),
        np.zeros((3, 5), dtype=np.float32),
    ]


@pytest.mark.parametrize(("encoding", "rel_err"), [("fp16", 1e-3), ("int8", 1.2e-2)])
def test_round_trip_error_is_small(encoding: str, rel_err: float) -> None:
    delta = _delta()
    got = decode(encode(delta, encoding), encoding, [a.shape for a in delta])
    for a, b in zip(delta, got, strict=True):
        assert b.dtype == np.float32 and b.shape == a.shape
        scale = float(np.max(np.abs(a))) or 1.0
        assert float(np.max(np.abs(a - b))) <= rel_err * scale  # per-tensor scale: relative
    assert not np.any(got[4])  # zeros stay zero


def test_fp32_is_unchanged() -> None:
    delta = _delta()
    got = decode(encode(delta, "fp32"), "fp32", [a.shape for a in delta])
    for a, b in zip(delta, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_encoded_sizes() -> None:
    delta = _delta()
    fp32 = payload_digest(encode(delta, "fp32")).bytes
    fp16 = payload_digest(encode(delta, "fp16")).bytes
    int8 = payload_digest(encode(delta, "int8")).bytes
    raw = sum(a.size for a in delta) * 4
    assert fp32 > raw
    assert fp16 < 0.51 * fp32
    assert int8 < 0.26 * fp32
    assert len(encode(delta, "int8")) == 2  # codes + scales: two serialisation headers


@pytest.mark.parametrize("encoding", ["fp16", "int8"])
def test_norm_never_grows(encoding: str) -> None:
    """A delta clipped at the site (site-level DP) stays within its bound after encoding."""
    for seed in range(20):
        delta = _delta(seed)
        got = decode(encode(delta, encoding), encoding, [a.shape for a in delta])
        for a, b in zip(delta, got, strict=True):
            assert np.linalg.norm(b.astype(np.float64)) <= np.linalg.norm(a.astype(np.float64))


def test_decode_rejects_a_payload_that_does_not_fit() -> None:
    delta = _delta()
    enc = encode(delta, "int8")
    with pytest.raises(CodecError, match="do not fit"):
        decode(enc, "int8", [a.shape for a in delta[:-1]])
    with pytest.raises(CodecError, match="do not fit"):
        decode([enc[0].astype(np.float16), enc[1]], "int8", [a.shape for a in delta])
    with pytest.raises(CodecError, match="2 arrays"):
        decode(delta, "fp16", [a.shape for a in delta])


def test_config_key_and_secagg_refusal() -> None:
    assert load_config(overrides=["federation.update_encoding=int8"]).federation.update_encoding \
        == "int8"
    with pytest.raises(ConfigError, match="update_encoding"):
        load_config(overrides=["federation.update_encoding=int4"])
    for enc in ("int8", "fp16"):
        with pytest.raises(ConfigError, match="SecAgg"):
            load_config(overrides=[f"federation.update_encoding={enc}",
                                   "federation.secagg=true"])
    assert load_config(overrides=["federation.secagg=true"]).federation.update_encoding == "fp32"


def _reply(arrays, n, **metrics):
    return (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics))


@pytest.mark.parametrize("cls", [FedAvg, FedAdam])  # streaming and non-streaming server paths
def test_server_decodes_mixed_encodings(cls) -> None:
    g = [np.ones((8, 384), np.float32), np.ones((384, 8), np.float32)]
    d1, d2 = _delta(1)[:2], _delta(2)[:2]
    info = {}
    strategy = cls(initial_parameters=ndarrays_to_parameters(g))
    strategy.on_round_info = lambda r, i: info.update(i)
    strategy.initialize_parameters(client_manager=None)
    replies = [_reply(encode(d1, "int8"), 30, **{METRIC_KEY: "int8"}),
               _reply(encode(d2, "fp16"), 10, **{METRIC_KEY: "fp16"})]
    params, _ = strategy.aggregate_fit(1, replies, [])
    got = parameters_to_ndarrays(params)
    # What the server must have used: the decoded deltas.
    q1 = decode(encode(d1, "int8"), "int8", [a.shape for a in d1])
    q2 = decode(encode(d2, "fp16"), "fp16", [a.shape for a in d2])
    if cls is FedAvg:
        expected = [g0 + (30 * a + 10 * b) / 40 for g0, a, b in zip(g, q1, q2, strict=True)]
    else:  # Flower's FedAdam on fp32 replies of the same (decoded) deltas
        reference = cls(initial_parameters=ndarrays_to_parameters(g))
        reference.initialize_parameters(client_manager=None)
        expected = parameters_to_ndarrays(
            reference.aggregate_fit(1, [_reply(q1, 30), _reply(q2, 10)], [])[0]
        )
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert info["sites"] == 2 and info["streaming"] is (cls is FedAvg)
    assert info["upload_bytes"] == sum(len(t) for _, r in replies for t in r.parameters.tensors)


def test_server_drops_a_malformed_reply() -> None:
    g = [np.zeros((8, 384), np.float32)]
    strategy = FedAvg(initial_parameters=ndarrays_to_parameters(g))
    strategy.initialize_parameters(client_manager=None)
    good = [np.full((8, 384), 0.5, np.float32)]
    bad = encode([np.ones((4, 4), np.float32)], "int8")
    params, _ = strategy.aggregate_fit(
        1, [_reply(good, 3), _reply(bad, 100, **{METRIC_KEY: "int8"})], []
    )
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], 0.5)
