"""Site-level central DP (DP-FedAvg) with Flower's `DifferentialPrivacy*Clipping` wrappers.

McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018;
adaptive clipping: Andrew et al., "Differentially Private Learning with Adaptive Clipping",
NeurIPS 2021. Each site's update is clipped to L2 norm C, the updates are averaged with equal
weight, and Gaussian noise of std z C / n (n = sites sampled per round) is added to the mean.

Composition, outermost first:

    DeltaAggregation          drops declined sites, rebuilds every reply as global + delta
      _SiteLevelDP            equal weights; accounts each released aggregate
        Flower DP wrapper     (server side) clips weights - current global; adds the noise
          configured strategy its Flower half only (`replies_are_deltas = False`): averages

Flower's wrappers compute `reply - current parameters`, so they must see weights: the
delta -> weights conversion happens outside them. With client-side clipping the site clips its
own delta (client/central_clip.py) and the wrapper only sends the norm and adds the noise.

Accounting (server side, reported every round): each released aggregate is a Gaussian mechanism
on the sum of m clipped updates (sensitivity C when one site is added or removed) with noise std
z C m / n, i.e. noise multiplier z m / n (<= z; smaller when sites declined), composed over rounds
without sampling amplification (as Flower's own accounted wrappers do), with RDP and PRV. With
adaptive clipping the noisy clipped-count is a second Gaussian release in every round.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.common import FitRes, Parameters, Scalar
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedtune.common.config import CENTRAL_DP_STRATEGIES, CentralDPConfig, RunConfig
from fedtune.common.privacy import Mechanism, epsilons
from fedtune.server.strategy.delta import DeltaAggregation

OnRelease = Callable[[int, dict], None]


def site_level_delta(cdp: CentralDPConfig, num_sites: int) -> float:
    return cdp.delta if cdp.delta is not None else 0.1 / num_sites


class _SiteLevelDP:
    """Between DeltaAggregation and a Flower DP wrapper: equal weights, and the accountant."""

    def __init__(self, *args, site_delta: float, on_release: OnRelease | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.site_delta = site_delta
        self.on_release = on_release
        self.releases: list[Mechanism] = []

    def effective_noise_multiplier(self, aggregated: int) -> float:
        """Noise std / sensitivity of the released aggregate of `aggregated` clipped updates."""
        scale = aggregated / self.num_sampled_clients  # noise is z C / n on a mean over m
        z_update = self.noise_multiplier * scale
        count_std = getattr(self, "clipped_count_stddev", 0.0) or 0.0
        if count_std <= 0:  # fixed clipping (or no clipped-count noise)
            return z_update
        # Adaptive clipping also releases a noisy count of clipped updates. One site joining
        # changes that count by at most 1, so it is a Gaussian mechanism of noise multiplier
        # count_std; the two compose like one Gaussian of this z. (Flower splits the configured
        # z assuming sensitivity 1/2, as Andrew et al. do for centred bits; counting 1 is the
        # conservative choice: the reported epsilon can only be higher.)
        return (z_update**-2 + count_std**-2) ** -0.5

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list,
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # Site-level sensitivity C / n needs equal weights, not examples (which are private).
        equal = [(c, FitRes(r.status, r.parameters, 1, r.metrics)) for c, r in results]
        clipping_norm = float(self.clipping_norm)  # adaptive wrappers update it in aggregate_fit
        params, metrics = super().aggregate_fit(server_round, equal, failures)
        if params is None:
            return params, metrics  # nothing released, nothing spent
        z = self.effective_noise_multiplier(len(results))
        self.releases.append((z, 1.0, 1))
        eps = epsilons(self.releases, self.site_delta)
        info = {
            "round": server_round,
            "side": self.side,
            "clipping": self.clipping_kind,
            "clipping_norm": clipping_norm,
            "noise_multiplier": float(self.noise_multiplier),
            "noise_multiplier_effective": z,
            "sites_aggregated": len(results),
            "sites_sampled": int(self.num_sampled_clients),
            "releases": len(self.releases),
            "delta": self.site_delta,
            "epsilon_rdp": eps["rdp"],
            "epsilon_prv": eps["prv"],
        }
        if self.on_release is not None:
            self.on_release(server_round, info)
        return params, {**metrics, "central_dp_epsilon": eps["rdp"]}


def _compose(wrapper: type[Strategy], side: str, kind: str) -> type:
    name = f"Delta{wrapper.__name__}"
    attrs = {"side": side, "clipping_kind": kind, "__doc__": f"{name}: see module docstring."}
    return type(name, (DeltaAggregation, _SiteLevelDP, wrapper), attrs)


WRAPPERS: dict[tuple[str, str], type] = {
    ("server", "fixed"): _compose(DifferentialPrivacyServerSideFixedClipping, "server", "fixed"),
    ("server", "adaptive"): _compose(DifferentialPrivacyServerSideAdaptiveClipping, "server",
                                     "adaptive"),
    ("client", "fixed"): _compose(DifferentialPrivacyClientSideFixedClipping, "client", "fixed"),
    ("client", "adaptive"): _compose(DifferentialPrivacyClientSideAdaptiveClipping, "client",
                                     "adaptive"),
}


def with_central_dp(inner: DeltaAggregation, cfg: RunConfig,
                    on_release: OnRelease | None = None) -> Strategy:
    """Wrap a configured (delta) strategy with site-level DP; the result takes its place."""
    fed, cdp = cfg.federation, cfg.central_dp
    if fed.strategy not in CENTRAL_DP_STRATEGIES:
        raise ValueError(
            f"central_dp needs a strategy whose aggregate is the mean of the updates "
            f"({', '.join(sorted(CENTRAL_DP_STRATEGIES))}); {fed.strategy!r} is not"
        )
    if cdp.side == "server" and fed.secagg:  # also when a deployment turned SecAgg+ on
        raise ValueError("central_dp.side = 'server' needs each site's update; with SecAgg+ "
                         "the server sees only their sum: set central_dp.side = 'client'")
    # The wrapper below sees weights and the inner strategy gets them: it must not rebuild them,
    # and the checkpoint hook moves to the outside, where the noisy aggregate is final.
    after_aggregate, inner.after_aggregate = inner.after_aggregate, None
    inner.replies_are_deltas = False
    sampled = inner.num_fit_clients(fed.num_sites)[0]
    common = {
        "strategy": inner, "noise_multiplier": cdp.noise_multiplier,
        "num_sampled_clients": sampled, "after_aggregate": after_aggregate,
        "site_delta": site_level_delta(cdp, fed.num_sites), "on_release": on_release,
    }
    cls = WRAPPERS[(cdp.side, cdp.clipping)]
    if cdp.clipping == "fixed":
        return cls(clipping_norm=cdp.clipping_norm, **common)
    return cls(initial_clipping_norm=cdp.clipping_norm,
               target_clipped_quantile=cdp.target_clipped_quantile,
               clip_norm_lr=cdp.clip_norm_lr, clipped_count_stddev=cdp.clipped_count_stddev,
               **common)
