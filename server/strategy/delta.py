"""Delta aggregation: sites reply with adapter deltas, Flower's strategies expect weights.

The mixin rebuilds each reply as `global + delta` and hands it to the wrapped Flower strategy,
so every legacy Flower strategy (FedAvg, FedProx, FedAdam, FedYogi, the DP wrappers) works
unchanged, and so does SecAgg+ (its workflow passes the already-summed delta as every reply).
"""

from __future__ import annotations

from collections.abc import Callable
from logging import WARNING

import numpy as np
from flwr.common import (
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    log,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

# Called after each round with (round, new global adapter, per-site fit metrics).
AfterAggregate = Callable[[int, NDArrays, list[dict[str, Scalar]]], None]


class DeltaAggregation:
    """Mix in before a Flower strategy: `class FedAvg(DeltaAggregation, flwr FedAvg)`."""

    def __init__(self, *args, after_aggregate: AfterAggregate | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after_aggregate = after_aggregate
        self.global_adapter: NDArrays | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        params = super().initialize_parameters(client_manager)
        if params is not None:
            self.global_adapter = parameters_to_ndarrays(params)
        return params

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list,
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        site_metrics = [dict(res.metrics) for _, res in results]
        # A site that declined (privacy budget exhausted) replies with zero examples.
        results = [(c, r) for c, r in results if r.num_examples > 0]
        if not results or self.global_adapter is None:
            log(WARNING, "round %s: no site trained; global adapter unchanged", server_round)
            return None, {}
        rebuilt = []
        for proxy, res in results:
            delta = parameters_to_ndarrays(res.parameters)
            weights = [g + d for g, d in zip(self.global_adapter, delta, strict=True)]
            rebuilt.append(
                (proxy, FitRes(res.status, ndarrays_to_parameters(weights), res.num_examples,
                               res.metrics))
            )
        params, metrics = super().aggregate_fit(server_round, rebuilt, failures)
        if params is not None:
            self.global_adapter = [np.asarray(a) for a in parameters_to_ndarrays(params)]
            if self.after_aggregate:
                self.after_aggregate(server_round, self.global_adapter, site_metrics)
        return params, metrics
