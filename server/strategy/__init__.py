"""Server strategies, one per file. `STRATEGIES` maps the config name to the class."""

from server.strategy.delta import DeltaAggregation
from server.strategy.fedadam import FedAdam
from server.strategy.fedavg import FedAvg
from server.strategy.fedavgm import FedAvgM
from server.strategy.fedprox import FedProx
from server.strategy.fedyogi import FedYogi
from server.strategy.ffa_lora import FfaLora
from server.strategy.product_svd import ProductSvd

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
