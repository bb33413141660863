"""FedAdam over adapter deltas: an Adam step on the server, the averaged delta as pseudo-gradient.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021. Each round the example-weighted mean
of the sites' deltas, Delta_t, feeds Adam's moments m_t = b1 m + (1-b1) Delta_t and
v_t = b2 v + (1-b2) Delta_t^2, and the global adapter moves by eta_t m_t / (sqrt(v_t) + tau).
The optimizer is Flower's `FedAdam` (which also bias-corrects eta); knobs: `federation.server_lr`
(eta, default 1e-2), `server_beta1`, `server_beta2`, `server_tau`.
"""

from __future__ import annotations

import torch
from flwr.server.strategy import FedAdam as FlowerFedAdam

from fedtune.common.config import RunConfig
from fedtune.server.strategy.delta import DeltaAggregation


def server_optimizer_kwargs(cfg: RunConfig) -> dict:
    fed = cfg.federation
    eta = fed.server_lr if fed.server_lr is not None else 1e-2
    return {"eta": eta, "beta_1": fed.server_beta1, "beta_2": fed.server_beta2,
            "tau": fed.server_tau, "eta_l": cfg.train.lr}


class FedAdam(DeltaAggregation, FlowerFedAdam):
    """Server-side Adam on the mean LoRA delta."""

    @classmethod
    def config_kwargs(cls, cfg: RunConfig, model: torch.nn.Module) -> dict:
        return server_optimizer_kwargs(cfg)
