"""FedAvg over deltas, through the real Flower strategy, against a hand computation."""

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedtune.server.strategy import FedAvg


def _reply(delta, n, **metrics):
    return (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(delta), n, metrics))


def test_fedavg_of_deltas_matches_hand_computation():
    g = [np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), np.array([0.5], dtype=np.float32)]
    d1 = [np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32), np.array([2.0], dtype=np.float32)]
    d2 = [np.array([[-1.0, 1.0], [1.0, -1.0]], dtype=np.float32),
          np.array([-1.0], dtype=np.float32)]
    seen = {}
    strategy = FedAvg(
        initial_parameters=ndarrays_to_parameters(g),
        after_aggregate=lambda r, adapter, sites: seen.update(r=r, adapter=adapter, sites=sites),
    )
    strategy.initialize_parameters(client_manager=None)
    params, _ = strategy.aggregate_fit(1, [_reply(d1, 30, site_id="a"), _reply(d2, 10)], [])
    got = parameters_to_ndarrays(params)
    # by hand: g + (30*d1 + 10*d2) / 40
    expected_w = np.array([[1.0 + 0.5, 2.0 + 0.25], [3.0 + 0.25, 4.0 + 0.5]])
    expected_b = np.array([0.5 + (60 - 10) / 40])
    np.testing.assert_allclose(got[0], expected_w, rtol=1e-6)
    np.testing.assert_allclose(got[1], expected_b, rtol=1e-6)
    assert seen["r"] == 1 and seen["sites"][0]["site_id"] == "a"
    np.testing.assert_allclose(seen["adapter"][0], expected_w, rtol=1e-6)

    # The next round starts from the new global: a zero delta leaves it unchanged.
    zero = [np.zeros_like(a) for a in g]
    params2, _ = strategy.aggregate_fit(2, [_reply(zero, 5)], [])
    np.testing.assert_allclose(parameters_to_ndarrays(params2)[0], expected_w, rtol=1e-6)


def test_declined_sites_do_not_count():
    g = [np.zeros(3, dtype=np.float32)]
    strategy = FedAvg(initial_parameters=ndarrays_to_parameters(g))
    strategy.initialize_parameters(client_manager=None)
    d = [np.array([1.0, 2.0, 3.0], dtype=np.float32)]
    declined = [np.array([100.0, 100.0, 100.0], dtype=np.float32)]
    params, _ = strategy.aggregate_fit(1, [_reply(d, 4), _reply(declined, 0)], [])
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], d[0])
    # Nobody trained: no new global adapter.
    params, _ = strategy.aggregate_fit(2, [_reply(declined, 0)], [])
    assert params is None
