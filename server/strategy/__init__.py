"""Server strategies, one per file. `STRATEGIES` maps the config name to the class."""

from fedtune.server.strategy.delta import DeltaAggregation
from fedtune.server.strategy.fedadam import FedAdam
from fedtune.server.strategy.fedavg import FedAvg
from fedtune.server.strategy.fedavgm import FedAvgM
from fedtune.server.strategy.fedprox import FedProx
from fedtune.server.strategy.fedyogi import FedYogi
from fedtune.server.strategy.ffa_lora import FfaLora
from fedtune.server.strategy.product_svd import ProductSvd

STRATEGIES = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "ffa_lora": FfaLora,
    "product_svd": ProductSvd,
}

__all__ = [
    "STRATEGIES", "DeltaAggregation", "FedAdam", "FedAvg", "FedAvgM", "FedProx", "FedYogi",
    "FfaLora", "ProductSvd",
]
