"""Server strategies, one per file. `STRATEGIES` maps the config name to the class."""

from server.strategy.delta import DeltaAggregation
from server.strategy.fedavg import FedAvg

STRATEGIES = {"fedavg": FedAvg}

__all__ = ["STRATEGIES", "DeltaAggregation", "FedAvg"]
