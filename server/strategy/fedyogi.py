"""FedYogi over adapter deltas: a Yogi step on the server, the averaged delta as pseudo-gradient.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Yogi: Zaheer et al., NeurIPS 2018).
Like FedAdam, but the second moment moves additively,
v_t = v - (1-b2) Delta_t^2 sign(v - Delta_t^2), so it grows and shrinks more slowly than Adam's.
The optimizer is Flower's `FedYogi`; knobs as for FedAdam (`federation.server_lr`, ...).
"""

from __future__ import annotations

import torch
from flwr.server.strategy import FedYogi as FlowerFedYogi

from fedtune.common.config import RunConfig
from fedtune.server.strategy.delta import DeltaAggregation
from fedtune.server.strategy.fedadam import server_optimizer_kwargs


class FedYogi(DeltaAggregation, FlowerFedYogi):
    """Server-side Yogi on the mean LoRA delta."""

    @classmethod
    def config_kwargs(cls, cfg: RunConfig, model: torch.nn.Module) -> dict:
        return server_optimizer_kwargs(cfg)
