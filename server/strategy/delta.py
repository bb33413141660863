"""Delta aggregation: sites reply with adapter deltas, Flower's strategies expect weights.

The mixin rebuilds each reply as `global + delta` and hands it to the wrapped Flower strategy,
so every legacy Flower strategy (FedAvg, FedProx, FedAdam, FedYogi, the DP wrappers) works
unchanged, and so does SecAgg+ (its workflow passes the already-summed delta as every reply).

Replies may be encoded (fp16 / int8, `federation.update_encoding`, common/codec.py); each is
decoded to float32 here, first. When the wrapped Flower half is plain FedAvg's weighted mean
(FedAvg, FedProx, FFA-LoRA), the new global adapter is computed by a streaming weighted sum
(server/aggregation.py) that holds one decoded update at a time instead of rebuilding them all.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from logging import ERROR, WARNING

import numpy as np
import torch
from flwr.common import (
    FitIns,
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
from flwr.server.strategy import FedAvg as FlowerFedAvg

from fedtune.common.codec import METRIC_KEY, CodecError, decode
from fedtune.common.config import RunConfig
from fedtune.common.payload import received_sha256
from fedtune.common.protocol import parse_site_refusal
from fedtune.server.aggregation import streaming_mean
from fedtune.server.validation import (
    Rejection,
    UpdateChecks,
    check_metadata,
    site_of,
    validate_aggregate,
    validate_update,
)

# Called after each round with (round, new global adapter, per-site fit metrics).
AfterAggregate = Callable[[int, NDArrays, list[dict[str, Scalar]]], None]
# Called after each aggregation with (round, {"seconds", "sites", "upload_bytes", "streaming",
# "received_sha256": {site: SHA-256 of its reply as received} without SecAgg+}).
OnRoundInfo = Callable[[int, dict], None]
# Called every round with (round, per-site metrics: replies and refusals), aggregated or not.
OnSiteReplies = Callable[[int, list[dict[str, Scalar]]], None]
# Called every round with {node id: site name} of the sites that replied (server/participation.py
# names a site that later drops out by its node id).
OnSiteNodes = Callable[[dict[int, str]], None]


def refusals(failures: list) -> list[dict[str, Scalar]]:
    """Sites that refused by failing a message (a SecAgg+ setup below their policy), by name."""
    out: list[dict[str, Scalar]] = []
    for f in failures:
        if not isinstance(f, BaseException):
            continue
        err = f.args[0] if f.args else f
        found = parse_site_refusal(str(getattr(err, "reason", None) or err))
        if found is not None:
            out.append({"site_id": found[0], "status": "refused", "reason": found[1]})
    return out


class DeltaAggregation:
    """Mix in before a Flower strategy: `class FedAvg(DeltaAggregation, flwr FedAvg)`."""

    # False when an outer wrapper already rebuilt the weights (site-level DP, central_dp.py):
    # then only the Flower half of the strategy aggregates.
    replies_are_deltas: bool = True
    on_round_info: OnRoundInfo | None = None  # set by server/server_app.py (the run recorder)
    on_site_replies: OnSiteReplies | None = None  # likewise
    on_site_nodes: OnSiteNodes | None = None  # likewise
    # What server/validation.py checks in each reply (set by server/server_app.py; shapes are filled
    # in from the global adapter). None: structure and finite values only.
    update_checks: UpdateChecks | None = None

    def __init__(self, *args, after_aggregate: AfterAggregate | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after_aggregate = after_aggregate
        self.global_adapter: NDArrays | None = None
        self._rejected: list[Rejection] = []  # this round's rejected updates (validation)
        self._round = 0

    @classmethod
    def config_kwargs(cls, cfg: RunConfig, model: torch.nn.Module) -> dict:
        """Strategy-specific constructor arguments from the config and the server's model."""
        return {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        params = super().initialize_parameters(client_manager)
        if params is not None:
            self.global_adapter = parameters_to_ndarrays(params)
        return params

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager,
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Flower's, with the sample sized once `min_available_clients` sites are connected.

        Flower 1.39's FedAvg.configure_fit computes the sample size from the sites available
        *before* `sample()` waits for `min_available_clients` (flwr/server/strategy/fedavg.py,
        `configure_fit`: `num_fit_clients(client_manager.num_available())`, then `sample()`).
        A round that starts while a site is (re)connecting (a restarted site, a slow start)
        therefore samples too few sites: 2 of 3 with `fraction_fit = 1`. With SecAgg+ that
        leaves no room for a dropout (threshold 2), and with 2 sites each could recover the
        other's update from the sum, which the start-up checks refuse (common/config.py).
        """
        # num_available() first: in a deployment it refreshes the list of connected sites
        # (Flower's client-manager thread otherwise does so only every 5 s).
        # Flower's DP wrappers have no min_available_clients: their inner strategy waits.
        needed = getattr(self, "min_available_clients", 0)
        if client_manager.num_available() < needed:
            client_manager.wait_for(needed, timeout=86400)  # as Flower's sample()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list,
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not self.replies_are_deltas:
            return super().aggregate_fit(server_round, results, failures)
        site_metrics = [dict(res.metrics) for _, res in results] + refusals(failures)
        if self.on_site_replies is not None:  # also when no site trained: refusals by name
            self.on_site_replies(server_round, site_metrics)
        if self.on_site_nodes is not None:
            self.on_site_nodes({proxy.node_id: site_of(res.metrics) for proxy, res in results})
        # The server hashes each reply itself (to match the site's ledger); a site does not send
        # its hash. Under SecAgg+ a single reply is masked: nothing per site to hash.
        self._received = {} if (self.update_checks or UpdateChecks()).secagg else {
            site_of(res.metrics): received_sha256(res.parameters.tensors) for _, res in results
        }
        # A site that declined (privacy budget exhausted) replies with zero examples.
        results = [(c, r) for c, r in results if r.num_examples > 0]
        if not results or self.global_adapter is None:
            log(WARNING, "round %s: no site trained; global adapter unchanged", server_round)
            return None, {}
        started = time.perf_counter()
        upload = sum(len(t) for _, r in results for t in r.parameters.tensors)
        self._round, self._rejected = server_round, []
        if self._checks().secagg and self._secagg_rejected(results):
            self._round_info(server_round, started, results, upload, False)
            return None, {}
        streaming = self._streams_mean()
        new_global: NDArrays | None = None
        if streaming:
            params, metrics, new_global = self._streaming_fedavg(server_round, results, failures)
            if params is not None and not self._enough(len(results) - len(self._rejected)):
                params, metrics, new_global = None, {}, None
        else:
            rebuilt = []
            for proxy, res in results:
                delta = self._decode(res)
                if delta is None:
                    continue
                weights = [g + d for g, d in zip(self.global_adapter, delta, strict=True)]
                rebuilt.append(
                    (proxy, FitRes(res.status, ndarrays_to_parameters(weights),
                                   res.num_examples, res.metrics))
                )
            params, metrics = (super().aggregate_fit(server_round, rebuilt, failures)
                               if self._enough(len(rebuilt)) else (None, {}))
        if params is not None:
            self.global_adapter = new_global or [
                np.asarray(a) for a in parameters_to_ndarrays(params)
            ]
            if self.after_aggregate:
                self.after_aggregate(server_round, self.global_adapter, site_metrics)
        self._round_info(server_round, started, results, upload, streaming)
        return params, metrics

    def _round_info(self, server_round: int, started: float, results: list, upload: int,
                    streaming: bool) -> None:
        if self.on_round_info is not None:
            self.on_round_info(server_round, {
                "seconds": time.perf_counter() - started, "sites": len(results),
                "upload_bytes": upload, "streaming": streaming,
                **({"received_sha256": self._received} if getattr(self, "_received", None)
                   else {}),
                **({"rejected": [r.as_dict() for r in self._rejected]} if self._rejected else {}),
            })

    def _checks(self) -> UpdateChecks:
        assert self.global_adapter is not None
        return dataclasses.replace(self.update_checks or UpdateChecks(),
                                   shapes=tuple(g.shape for g in self.global_adapter))

    def _min_sites(self) -> int:
        """federation.min_fit_sites, as set in update_checks by server/server_app.py (default 1)."""
        return self.update_checks.min_updates if self.update_checks else 1

    def _enough(self, valid: int) -> bool:
        """At least federation.min_fit_sites valid updates; otherwise the round is void."""
        if valid >= self._min_sites():
            return True
        log(ERROR, "round %s: only %s valid update(s), fewer than federation.min_fit_sites = %s;"
            " the global adapter is left unchanged", self._round, valid, self._min_sites())
        return False

    def _reject(self, site_id: str, reason: str) -> None:
        self._rejected.append(Rejection(site_id, reason))
        log(ERROR, "round %s: update from site %s rejected: %s; the round goes on without it",
            self._round, site_id, reason)

    def _secagg_rejected(self, results: list[tuple[ClientProxy, FitRes]]) -> bool:
        """SecAgg+: every reply carries the same unmasked aggregate; validate it once, and each
        site's plain metadata. True (logged) when the round must be discarded."""
        checks = self._checks()
        for _, res in results:
            if (problem := check_metadata(res.metrics, checks)) is not None:
                self._reject(site_of(res.metrics), problem)
        problem = validate_aggregate(parameters_to_ndarrays(results[0][1].parameters), checks)
        if problem is not None:
            self._reject("(aggregate of " + ", ".join(site_of(r.metrics) for _, r in results)
                         + ")", problem)
        if self._rejected:
            log(ERROR, "round %s: SecAgg+ hides the individual updates, so a bad one cannot be "
                "removed from the sum: the round is discarded", self._round)
        return bool(self._rejected)

    def _decode(self, res: FitRes) -> NDArrays | None:
        """A reply's delta as float32 tensors; None (rejected and logged with the site's id and
        the reason) when it fails validation (server/validation.py)."""
        assert self.global_adapter is not None
        encoding = str(res.metrics.get(METRIC_KEY, "fp32"))
        checks = self._checks()
        arrays = parameters_to_ndarrays(res.parameters)
        if checks.secagg:  # the aggregate, validated once in _secagg_rejected
            try:
                return decode(arrays, encoding, checks.shapes)
            except CodecError as e:
                self._reject(site_of(res.metrics), str(e))
                return None
        delta, problem = validate_update(arrays, encoding, res.metrics, checks)
        if problem is not None:
            self._reject(site_of(res.metrics), problem)
        return delta

    def _streams_mean(self) -> bool:
        """True when the next aggregate_fit after this mixin is Flower FedAvg's weighted mean."""
        mro = type(self).__mro__
        for cls in mro[mro.index(DeltaAggregation) + 1 :]:
            if "aggregate_fit" in vars(cls):
                return cls is FlowerFedAvg
        return False

    def _streaming_fedavg(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list,
    ) -> tuple[Parameters | None, dict[str, Scalar], NDArrays | None]:
        """What Flower's FedAvg.aggregate_fit returns (and the new global adapter), by a
        running sum of the decoded deltas."""
        assert self.global_adapter is not None
        if not self.accept_failures and failures:  # as Flower's FedAvg
            return None, {}, None
        kept: list[tuple[int, dict[str, Scalar]]] = []  # never the replies themselves

        def updates() -> Iterator[tuple[NDArrays, float]]:
            for _, res in results:
                delta = self._decode(res)
                if delta is not None:
                    kept.append((res.num_examples, res.metrics))
                    yield delta, float(res.num_examples)
                del delta  # not alive while the next reply is decoded

        try:
            new_global, _ = streaming_mean(self.global_adapter, updates())
        except ValueError:  # every reply was malformed
            return None, {}, None
        params = ndarrays_to_parameters(new_global)
        metrics: dict[str, Scalar] = {}
        if self.fit_metrics_aggregation_fn:
            metrics = self.fit_metrics_aggregation_fn(kept)
        return params, metrics, new_global
