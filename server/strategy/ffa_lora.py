"""FFA-LoRA: federated LoRA with the A matrices frozen; only B is trained, sent and averaged.

Sun, Li, Ding & Chen, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024.
Averaging the LoRA factors separately is not averaging the updates: mean(B_k) mean(A_k) differs
from mean(B_k A_k). FFA-LoRA fixes A at its random initialisation, identical at every site
(`lora.init_seed`, drawn on the CPU by `common.lora.apply_lora(freeze_a=True)`), and trains only B,
which starts at zero. Then B A is linear in B and FedAvg of B is exactly FedAvg of the updates B A.
The upload per site halves for square layers (B only: d_out x r instead of (d_out + d_in) x r),
DP noise is added to half as many parameters, and the aggregation is Flower's `FedAvg`.

As A never travels, each site reports a digest of its A (`lora_a_digest`); a reply whose A differs
from the server's (another `lora.init_seed`, another LoRA version) is dropped with an error.
"""

from __future__ import annotations

from logging import ERROR

import torch
from flwr.common import FitRes, Parameters, Scalar, log
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as FlowerFedAvg

from fedtune.common.config import RunConfig
from fedtune.common.lora import lora_a_digest, trainable_names
from fedtune.server.strategy.delta import DeltaAggregation


class FfaLora(DeltaAggregation, FlowerFedAvg):
    """Example-weighted FedAvg of the B deltas; A stays frozen at the shared seeded init."""

    def __init__(self, *args, lora_a_digest: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lora_a_digest = lora_a_digest

    @classmethod
    def config_kwargs(cls, cfg: RunConfig, model: torch.nn.Module) -> dict:
        if any(".lora_A." in n for n in trainable_names(model)):
            raise ValueError("FFA-LoRA needs the LoRA A matrices frozen "
                             "(common.lora.apply_lora(..., freeze_a=True))")
        return {"lora_a_digest": lora_a_digest(model)}

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list,
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if self.lora_a_digest is not None:
            kept = []
            for proxy, res in results:
                got = res.metrics.get("lora_a_digest")
                if res.num_examples > 0 and got != self.lora_a_digest:
                    log(ERROR, "round %s: site %s has LoRA A digest %s, server has %s "
                        "(check lora.init_seed / lora settings); its update is dropped",
                        server_round, res.metrics.get("site_id", "?"), got, self.lora_a_digest)
                    failures = [*failures, (proxy, res)]
                    continue
                kept.append((proxy, res))
            results = kept
        return super().aggregate_fit(server_round, results, failures)
