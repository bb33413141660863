"""The site: a Flower ClientApp that trains the global LoRA adapter on local data with DP-SGD.

Wired the way SecAgg+ needs it in Flower 1.39: a legacy `NumPyClient` behind
`ClientApp(client_fn=..., mods=[secaggplus_mod])`. The reply is the adapter *delta*
(local - global), whose range is bounded, which is what SecAgg+'s fixed-point encoding needs.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import Mod
from flwr.common import Context

from fedtune.client.budget import UnitCounts, unit_counts
from fedtune.client.canaries import GradientCanaries
from fedtune.client.central_clip import clip_delta_if_asked
from fedtune.client.privacy_gate import (
    STATUS_BUDGET_EXHAUSTED,
    STATUS_OK,
    STATUS_REFUSED,
    admit_round,
)
from fedtune.client.randomness import round_seed
from fedtune.client.trainer import train_local
from fedtune.common.codec import METRIC_KEY, encode
from fedtune.common.config import RunConfig
from fedtune.common.data import EncodedDataset, Record, person_ids, read_records
from fedtune.common.disclosure import disclose
from fedtune.common.input_checks import check_task_records, warn_long_records
from fedtune.common.ledger import PrivacyLedger
from fedtune.common.lora import (
    LAYOUT_METRIC,
    adapter_layout,
    get_adapter,
    lora_a_digest,
    set_adapter,
)
from fedtune.common.model_cache import ModelRuntime, get_runtime
from fedtune.common.payload import payload_digest
from fedtune.common.tasks import encode_records, num_labels, resolve_task

log = logging.getLogger("fedtune.site")

__all__ = ["STATUS_BUDGET_EXHAUSTED", "STATUS_OK", "STATUS_REFUSED", "FedtuneClient", "SiteSpec",
           "build_client_app", "load_site_dataset"]


@dataclass(frozen=True)
class SiteSpec:
    """What a site knows about itself. Nothing here is ever sent to the server."""

    site_id: str
    data_path: Path
    state_dir: Path
    # Opt-in values this site agrees to send (common/disclosure.py), e.g. {"train_loss"}; set
    # by the site itself (site.toml), never by the run config in a deployment.
    disclose: frozenset[str] = frozenset()
    # An auditor site's secret canary file (client/canaries.py, `fedtune audit`); None: none.
    canaries: Path | None = None


# Tokenized site datasets, least recently used last. Bounded: a simulation worker serves many
# sites (1,000 in a large run), and memory must not grow with their number.
_DATA_CACHE: OrderedDict[tuple[str, float, str | None], EncodedDataset] = OrderedDict()
DATA_CACHE_SIZE = 4


def load_site_dataset(spec: SiteSpec, cfg: RunConfig, rt: ModelRuntime) -> EncodedDataset:
    """Read and tokenize this site's own file (an LRU cache of the last few sites per process;
    keyed by path + mtime)."""
    key = (str(spec.data_path), spec.data_path.stat().st_mtime, cfg.data.person_key)
    if key in _DATA_CACHE:
        _DATA_CACHE.move_to_end(key)
        return _DATA_CACHE[key]
    records = read_records(spec.data_path)
    # The run's columns and label set, every record, before any is used (DataError: file:line).
    check_task_records(records, cfg, rt.task, cfg.data.labels)
    warn_long_records(records, cfg, rt.task)
    data = encode_records(records, rt.tokenizer, cfg, rt.task, cfg.data.labels)
    data.persons = _persons(records, cfg)
    _DATA_CACHE[key] = data
    while len(_DATA_CACHE) > DATA_CACHE_SIZE:
        _DATA_CACHE.popitem(last=False)
    return data


def _persons(records: list[Record], cfg: RunConfig) -> list[str] | None:
    """Each record's person: required at person level (DataError file:line:key when missing);
    at record level read from data.person_column only if every record has it (for the
    report's group-privacy bound), else None."""
    column = cfg.data.person_key
    if column is None:
        return None
    if not cfg.data.person_level and any(column not in r.fields for r in records):
        log.warning("data.person_column = %r is not in every record of %s: the report states "
                    "no group-privacy bound for this site", column, records[0].source)
        return None
    return person_ids(records, column)


def site_units(cfg: RunConfig, data: EncodedDataset) -> UnitCounts:
    """The run's privacy unit and the site's persons, as its budget plan records them."""
    return unit_counts(cfg.data.privacy_unit, cfg.data.person_key, data.persons)


class FedtuneClient(NumPyClient):
    def __init__(self, spec: SiteSpec, cfg: RunConfig) -> None:
        self.spec = spec
        self.cfg = cfg

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list, int, dict]:
        """Train one round; the metrics returned are filtered by common/disclosure.py."""
        cfg, spec = self.cfg, self.spec
        task = resolve_task(cfg)
        run_id, rnd = str(config["run_id"]), int(config["server_round"])
        steps, total_rounds = int(config["local_steps"]), int(config["num_rounds"])
        metrics: dict = {"site_id": spec.site_id}

        def dataset() -> EncodedDataset:
            rt = get_runtime(cfg, task, num_labels(cfg, task))
            return load_site_dataset(spec, cfg, rt)

        sigma, q = 0.0, 0.0
        ledger = PrivacyLedger(spec.state_dir, spec.site_id)
        if cfg.dp.enabled:
            # Checked before the data is used; the spend is committed (fsync) before training.
            gate = admit_round(ledger, cfg, run_id=run_id, server_round=rnd, steps=steps,
                               rounds=total_rounds, count_records=lambda: len(dataset()),
                               count_units=lambda: site_units(cfg, dataset()))
            metrics.update(gate.metrics)
            if not gate.admitted:  # a zero-example reply carries no update
                zeros = [np.zeros_like(p) for p in parameters]
                _record_payload(ledger, run_id, rnd, metrics, zeros)
                return zeros, 0, disclose(metrics, spec.disclose)
            sigma, q = gate.noise_multiplier, gate.sample_rate
            unit = gate.privacy_unit
            if unit != cfg.data.privacy_unit:  # the plan of the run's first round rules
                raise RuntimeError(f"privacy unit mismatch: this run was planned per {unit!r} "
                                   f"at this site, the config now says {cfg.data.privacy_unit!r}")

        rt = get_runtime(cfg, task, num_labels(cfg, task))
        data = dataset()
        metrics["records"] = len(data)
        set_adapter(rt.model, parameters)
        canaries = GradientCanaries.open(spec.canaries, rt.model) if spec.canaries else None
        result = train_local(
            rt.model, data, task=task, pad_id=rt.pad_id, device=rt.device, train=cfg.train,
            dp=cfg.dp, noise_multiplier=sigma, steps=steps,
            # None: from OS entropy at the site; the run seed only if dp.reproducible_seed.
            seed=round_seed(cfg.dp, cfg.seed, spec.site_id, rnd),
            proximal_mu=float(config.get("proximal_mu", 0.0)),  # sent by FedProx only
            canaries=canaries,
            person_level=cfg.data.person_level,
            max_records_per_person=cfg.data.max_records_per_person,
        )
        if cfg.dp.enabled and not math.isclose(result.sample_rate, q):
            raise RuntimeError(f"sample rate mismatch: accounted {q}, trained {result.sample_rate}")
        local = get_adapter(rt.model)
        delta = [lo - np.asarray(g, dtype=np.float32) for lo, g in zip(local, parameters,
                                                                       strict=True)]
        if canaries is not None:  # the auditor keeps its canaries' coordinates, at the site
            canaries.observe(rnd, delta)
        # Not sent: examples_seen (the Poisson batch sizes) and timings (common/disclosure.py).
        metrics.update(status=STATUS_OK, train_loss=result.mean_loss)
        clipped = clip_delta_if_asked(delta, config)  # site-level DP with client-side clipping
        metrics.update(clipped)
        metrics[LAYOUT_METRIC] = adapter_layout(rt.model)  # names + shapes, checked by the server
        if cfg.federation.freeze_lora_a:  # FFA-LoRA: the server checks every site has its A
            metrics["lora_a_digest"] = lora_a_digest(rt.model)
        encoding = cfg.federation.update_encoding  # fp16 / int8: decoded by the server
        if encoding != "fp32":
            delta = encode(delta, encoding)
            metrics[METRIC_KEY] = encoding
        _record_payload(ledger, run_id, rnd, metrics, delta)
        # Site-level DP weighs sites equally, also inside SecAgg+'s weighted sum. Otherwise the
        # FedAvg weight is the site's record count, whatever the privacy unit (person-level runs
        # too: the weight is the amount of data, and records are what `num_examples` discloses).
        return delta, 1 if clipped else len(data), disclose(metrics, spec.disclose)


def _record_payload(ledger: PrivacyLedger, run_id: str, rnd: int, metrics: dict,
                    arrays: list[np.ndarray]) -> None:
    """Write (fsync) the size and hash of what is about to leave the site into its ledger (only
    there: the server hashes what it receives itself)."""
    digest = payload_digest(arrays)
    ledger.record_payload(run_id=run_id, round=rnd, status=str(metrics.get("status", "?")),
                          size=digest.bytes, sha256=digest.sha256, tensors=digest.tensors)


def _set_threads(cfg: RunConfig, parallel_sites: int) -> None:
    """train.threads, or this machine's cores shared among the sites that train at once."""
    cores = os.cpu_count() or 1
    torch.set_num_threads(cfg.train.threads or max(1, cores // max(1, parallel_sites)))


def build_client_app(
    cfg: RunConfig, resolve_site: Callable[[Context], SiteSpec], *, secagg: bool,
    extra_mods: Sequence[Mod] = (), parallel_sites: int = 1,
) -> ClientApp:
    """A ClientApp whose `client_fn` finds the site's own spec from the Flower context.

    `extra_mods` run inside SecAgg+, on the site's plain reply (e.g. the deployment's local
    audit copy of each sent update, client/supernode_app.py). `parallel_sites`: how many sites
    train at once on this machine (simulation workers); a deployed site (1) uses every core.
    """

    def client_fn(context: Context):
        _set_threads(cfg, parallel_sites)
        return FedtuneClient(resolve_site(context), cfg).to_client()

    mods = [secaggplus_mod] if secagg else []
    return ClientApp(client_fn=client_fn, mods=[*mods, *extra_mods])
