"""FedProx over adapter deltas.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020. Each site minimises its
loss plus the proximal term mu/2 ||w - w_global||^2 on the LoRA parameters, which keeps local
training on heterogeneous (non-IID) sites close to the global adapter. The server side is Flower's
`FedProx`: FedAvg aggregation, plus `proximal_mu` in every fit config; the site applies the term in
`client/trainer.py::train_local` (after the DP noise: it does not touch data, so it is free).
"""

from __future__ import annotations

import torch
from flwr.server.strategy import FedProx as FlowerFedProx

from fedtune.common.config import RunConfig
from fedtune.server.strategy.delta import DeltaAggregation


class FedProx(DeltaAggregation, FlowerFedProx):
    """Example-weighted FedAvg of LoRA deltas; sites train with a proximal term of weight mu."""

    @classmethod
    def config_kwargs(cls, cfg: RunConfig, model: torch.nn.Module) -> dict:
        return {"proximal_mu": cfg.federation.proximal_mu}
