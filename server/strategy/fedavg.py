"""FedAvg over adapter deltas.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017. The new global adapter is the global plus the example-weighted mean of the sites'
deltas; the averaging itself is Flower's `FedAvg`.
"""

from __future__ import annotations

from flwr.server.strategy import FedAvg as FlowerFedAvg

from fedtune.server.strategy.delta import DeltaAggregation


class FedAvg(DeltaAggregation, FlowerFedAvg):
    """Example-weighted FedAvg of LoRA deltas."""
