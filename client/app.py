"""The site: a Flower ClientApp that trains the global LoRA adapter on local data with DP-SGD.

Wired the way SecAgg+ needs it in Flower 1.39: a legacy `NumPyClient` behind
`ClientApp(client_fn=..., mods=[secaggplus_mod])`. The reply is the adapter *delta*
(local - global), whose range is bounded, which is what SecAgg+'s fixed-point encoding needs.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context

from client.ledger import PrivacyLedger
from client.trainer import poisson_sample_rate, train_local
from common.config import RunConfig
from common.data import EncodedDataset, read_records
from common.lora import get_adapter, set_adapter
from common.privacy import calibrate_noise, check_delta, epsilon
from common.runtime import ModelRuntime, get_runtime
from common.tasks import encode_records, num_labels, resolve_task

STATUS_OK = "ok"
STATUS_BUDGET_EXHAUSTED = "budget_exhausted"


@dataclass(frozen=True)
class SiteSpec:
    """What a site knows about itself. Nothing here is ever sent to the server."""

    site_id: str
    data_path: Path
    state_dir: Path


_DATA_CACHE: dict[tuple[str, float], EncodedDataset] = {}


def load_site_dataset(spec: SiteSpec, cfg: RunConfig, rt: ModelRuntime) -> EncodedDataset:
    """Read and tokenize this site's own file (cached per process; keyed by path + mtime)."""
    key = (str(spec.data_path), spec.data_path.stat().st_mtime)
    if key not in _DATA_CACHE:
        records = read_records(spec.data_path)
        _DATA_CACHE[key] = encode_records(records, rt.tokenizer, cfg, rt.task, cfg.data.labels)
    return _DATA_CACHE[key]


class FedtuneClient(NumPyClient):
    def __init__(self, spec: SiteSpec, cfg: RunConfig) -> None:
        self.spec = spec
        self.cfg = cfg

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list, int, dict]:
        cfg, spec = self.cfg, self.spec
        task = resolve_task(cfg)
        rt = get_runtime(cfg, task, num_labels(cfg, task))
        data = load_site_dataset(spec, cfg, rt)
        run_id, rnd = str(config["run_id"]), int(config["server_round"])
        steps, total_rounds = int(config["local_steps"]), int(config["num_rounds"])
        metrics: dict = {"site_id": spec.site_id, "records": len(data)}

        sigma, q = 0.0, 0.0
        ledger = PrivacyLedger(spec.state_dir, spec.site_id)
        if cfg.dp.enabled:
            dp = cfg.dp
            check_delta(dp.delta, len(data), where=f"site {spec.site_id}: ")
            q = poisson_sample_rate(len(data), cfg.train.batch_size)
            sigma = dp.noise_multiplier
            if sigma is None:  # calibrated so the whole planned run ends at target epsilon
                sigma = calibrate_noise(dp.target_epsilon, dp.delta, q, total_rounds * steps,
                                        dp.accountant)
            planned = [*ledger.history(run_id), (sigma, q, steps)]
            eps_next = epsilon(planned, dp.delta, dp.accountant)
            if dp.target_epsilon is not None and eps_next > dp.target_epsilon * 1.001:
                # Decline before touching the data; a zero-example reply carries no update.
                metrics.update(status=STATUS_BUDGET_EXHAUSTED,
                               epsilon=ledger.spent(dp.delta, dp.accountant, run_id))
                return [np.zeros_like(p) for p in parameters], 0, metrics
            # The spend is committed (fsync) before training: a crash can only over-count.
            row = ledger.record_round(
                run_id=run_id, round=rnd, noise_multiplier=sigma, sample_rate=q, steps=steps,
                max_grad_norm=dp.max_grad_norm, delta=dp.delta, records=len(data),
                accountant=dp.accountant,
            )
            metrics.update(
                epsilon=row.epsilon_run,
                epsilon_round=epsilon([(sigma, q, steps)], dp.delta, dp.accountant),
                epsilon_total=row.epsilon_total,
                delta=dp.delta,
                noise_multiplier=sigma,
                sample_rate=q,
            )

        set_adapter(rt.model, parameters)
        result = train_local(
            rt.model, data, task=task, pad_id=rt.pad_id, device=rt.device, train=cfg.train,
            dp=cfg.dp, noise_multiplier=sigma, steps=steps,
            seed=zlib.crc32(f"{cfg.seed}:{spec.site_id}:{rnd}".encode()),
        )
        if cfg.dp.enabled and not math.isclose(result.sample_rate, q):
            raise RuntimeError(f"sample rate mismatch: accounted {q}, trained {result.sample_rate}")
        local = get_adapter(rt.model)
        delta = [lo - np.asarray(g, dtype=np.float32) for lo, g in zip(local, parameters,
                                                                       strict=True)]
        metrics.update(status=STATUS_OK, train_loss=result.mean_loss,
                       examples_seen=result.examples_seen)
        return delta, len(data), metrics


def _set_threads(cfg: RunConfig) -> None:
    parallel = cfg.federation.parallel_sites or (os.cpu_count() or 1)
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // parallel))


def build_client_app(
    cfg: RunConfig, resolve_site: Callable[[Context], SiteSpec], *, secagg: bool
) -> ClientApp:
    """A ClientApp whose `client_fn` finds the site's own spec from the Flower context."""

    def client_fn(context: Context):
        _set_threads(cfg)
        return FedtuneClient(resolve_site(context), cfg).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secagg else [])
