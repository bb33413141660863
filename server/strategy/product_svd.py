"""Exact product aggregation of LoRA updates, re-factored to rank r by truncated SVD.

Averaging B and A separately gives mean(B_k) mean(A_k), not the mean update mean(B_k A_k)
(Sun et al., ICLR 2024, sec. 3; Wang et al., "FLoRA", NeurIPS 2024). This strategy averages the
product itself and keeps its best rank-r approximation (Eckart-Young), computed from thin QRs
without materialising the product; it needs each site's plain B and A, so not under SecAgg+.
Cost and error analysis: docs/internals.md.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.common import FitRes, NDArrays, Parameters, Scalar, parameters_to_ndarrays
from flwr.common import ndarrays_to_parameters as to_parameters
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as FlowerFedAvg

from fedtune.common.config import RunConfig
from fedtune.common.lora import trainable_names
from fedtune.server.strategy.delta import DeltaAggregation


def lora_pairs(names: list[str]) -> list[tuple[int, int]]:
    """(index of A, index of B) for every LoRA layer, from the adapter's tensor names."""
    index = {n: i for i, n in enumerate(names)}
    pairs = []
    for name, i in index.items():
        if ".lora_A." in name:
            partner = name.replace(".lora_A.", ".lora_B.")
            if partner not in index:
                raise ValueError(f"LoRA tensor {name} has no B partner ({partner}) in the adapter")
            pairs.append((i, index[partner]))
    if not pairs:
        raise ValueError("product aggregation needs trainable LoRA A/B tensors; none found")
    return pairs


def aggregate_products(
    factors: list[tuple[np.ndarray, np.ndarray]], weights: list[float], rank: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Best rank-`rank` (B, A) of sum_k w_k B_k A_k / sum_k w_k, and its relative error."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    p = np.concatenate([wk * b.astype(np.float64) for wk, (b, _) in zip(w, factors,
                                                                           strict=True)], axis=1)
    q = np.concatenate([a.astype(np.float64) for _, a in factors], axis=0)
    q1, r1 = np.linalg.qr(p)
    q2, r2 = np.linalg.qr(q.T)
    u, s, vt = np.linalg.svd(r1 @ r2.T)
    u, vt = q1 @ u, (q2 @ vt.T).T
    total = float(np.sum(s**2))
    tail = float(np.sum(s[rank:] ** 2))
    error = float(np.sqrt(tail / total)) if total > 0 else 0.0
    k = min(rank, len(s))
    b = np.zeros((p.shape[0], rank))
    a = np.zeros((rank, q.shape[1]))
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vt[:k]
    if k < rank:  # fewer directions than the rank: keep A's extra rows orthonormal, B zero
        a[k:] = _orthonormal_complement(a[:k], rank - k)
    dtype = factors[0][1].dtype
    return b.astype(dtype), a.astype(dtype), error


def _orthonormal_complement(rows: np.ndarray, n: int) -> np.ndarray:
    d = rows.shape[1]
    basis = np.linalg.qr(np.concatenate([rows.T, np.eye(d)], axis=1))[0]
    return basis[:, rows.shape[0] : rows.shape[0] + n].T


class _ProductFedAvg(FlowerFedAvg):
    """Flower's FedAvg for every tensor, then the LoRA pairs replaced by product aggregation."""

    def __init__(self, *args, param_names: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pairs = lora_pairs(param_names)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list,
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is None:
            return params, metrics
        merged: NDArrays = parameters_to_ndarrays(params)
        sites = [parameters_to_ndarrays(res.parameters) for _, res in results]
        weights = [float(res.num_examples) for _, res in results]
        worst = 0.0
        for ia, ib in self.pairs:
            rank = merged[ia].shape[0]
            b, a, err = aggregate_products([(s[ib], s[ia]) for s in sites], weights, rank)
            merged[ia], merged[ib] = a, b
            worst = max(worst, err)
        return to_parameters(merged), {**metrics, "svd_truncation_error": worst}


class ProductSvd(DeltaAggregation, _ProductFedAvg):
    """Exact weighted mean of the sites' B A per layer, truncated back to rank r by SVD."""

    @classmethod
    def config_kwargs(cls, cfg: RunConfig, model: torch.nn.Module) -> dict:
        return {"param_names": trainable_names(model)}
