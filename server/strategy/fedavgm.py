"""FedAvgM: FedAvg with server momentum on the averaged adapter delta.

Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", 2019 (arXiv:1909.06335). Each round the example-weighted mean of the sites'
deltas, Delta_t, feeds a momentum buffer m_t = beta m_(t-1) + Delta_t, and the global adapter
moves by eta m_t. Under DP-SGD at the sites the buffer also averages the sites' noise over
rounds: McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018,
train DP-FedAvg with server momentum 0.9. Momentum is post-processing of what the sites sent, so
it costs no privacy budget. With momentum beta the step of a steady delta is 1/(1-beta) times
FedAvg's: lower the sites' step size (`train.lr`, `train.head_lr`) to match.

The optimizer is Flower's `FedAvgM`; knobs: `federation.server_momentum` (beta) and
`federation.server_lr` (eta, default 1). The buffer is part of the server's saved state
(server/state.py), so `fedtune server --resume` continues with it.
"""

from __future__ import annotations

import torch
from flwr.common import Parameters, Scalar
from flwr.server.strategy import FedAvgM as FlowerFedAvgM

from fedtune.common.config import RunConfig
from fedtune.server.strategy.delta import DeltaAggregation


class _BufferFromFirstUpdate(FlowerFedAvgM):
    """Flower's FedAvgM starts the buffer in round 1 and asserts that it exists afterwards, so a
    first round without an update (every site declined, a discarded SecAgg+ round) would stop
    the server in round 2. Here the buffer starts with the first aggregated update."""

    def aggregate_fit(self, server_round: int, results: list, failures: list
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        first = self.momentum_vector is None
        return super().aggregate_fit(1 if first else server_round, results, failures)


class FedAvgM(DeltaAggregation, _BufferFromFirstUpdate):
    """Example-weighted FedAvg of the deltas, applied through a server momentum buffer."""

    @classmethod
    def config_kwargs(cls, cfg: RunConfig, model: torch.nn.Module) -> dict:
        fed = cfg.federation
        return {"server_learning_rate": fed.server_lr if fed.server_lr is not None else 1.0,
                "server_momentum": fed.server_momentum}
