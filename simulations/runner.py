"""`fedtune simulate`: N sites on one machine with Flower's simulation engine (Ray).

The run directory holds everything a run produces:

    runs/<run_id>/config.toml         effective configuration
    runs/<run_id>/eval.jsonl          the server's held-out split
    runs/<run_id>/sites/site-K/       one folder per simulated site: data/train.jsonl, state/
    runs/<run_id>/metrics.jsonl       one line per round (round 0 = before training)
    runs/<run_id>/adapter/            final global adapter (PEFT format)
    runs/<run_id>/checkpoints/        global adapter after every round

Each simulated site reads only its own `data/train.jsonl`: its client code never sees the other
sites' files, as in a real deployment.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedtune.client.budget import BudgetPlan, UnitCounts, plan_run, unit_counts
from fedtune.client.client_app import SiteSpec, build_client_app
from fedtune.client.site_policy import SIMULATION_POLICY, site_run_config
from fedtune.common.config import RunConfig, config_to_toml
from fedtune.common.data import (
    DataError,
    Record,
    person_ids,
    read_label_set,
    read_records,
    write_jsonl,
)
from fedtune.common.input_checks import (
    LengthReport,
    check_file_records,
    check_task_records,
    length_report,
)
from fedtune.common.models import ensure_cached
from fedtune.common.privacy import check_dp_range
from fedtune.common.round_record import read_rounds
from fedtune.common.run_layout import RunLayout, claim_run_dir, new_run_name
from fedtune.common.splits import HeldOut, load_source, split_eval
from fedtune.common.tasks import resolve_task
from fedtune.server.recorder import RoundListener
from fedtune.server.server_app import build_server_app
from fedtune.server.tracking import check_tracking
from fedtune.simulations import partition
from fedtune.simulations.stopping import same_priority_workers, stop_on_signal


@dataclass
class PreparedRun:
    cfg: RunConfig  # with data.labels filled in for classification
    run_id: str
    run_dir: Path
    eval_path: Path
    sites: list[SiteSpec]
    groups: list[str] | None  # natural split: the column value of each site
    held: HeldOut  # the server's evaluation records, and how many were available


def _partition(cfg: RunConfig, records: list[Record]) -> tuple[list[np.ndarray], list[str] | None]:
    d, n = cfg.data, cfg.federation.num_sites
    if d.partition == "iid" and d.person_level:  # a person's records stay at one site
        return partition.iid_groups(person_ids(records, d.privacy_unit), n, d.seed), None
    if d.partition == "iid":
        return partition.iid(len(records), n, d.seed), None
    if d.partition == "dirichlet":
        labels = [_column(r, d.label_column) for r in records]
        return partition.dirichlet(labels, n, d.dirichlet_alpha, d.seed), None
    values = [_column(r, d.partition_column) for r in records]
    return partition.by_column(values, n)


def _column(rec: Record, key: str | None) -> str:
    if key not in rec.fields:
        raise DataError(f"{rec.source}:{rec.line}: missing key '{key}' needed to partition")
    return str(rec.fields[key])


def _units(cfg: RunConfig, records: list[Record]) -> UnitCounts:
    """A site's privacy unit and persons, as the site itself will count them."""
    d = cfg.data
    if d.person_level:
        return unit_counts(d.privacy_unit, d.privacy_unit, person_ids(records, d.privacy_unit))
    if d.person_column and all(d.person_column in r.fields for r in records):
        return unit_counts("record", d.person_column, person_ids(records, d.person_column))
    return UnitCounts()


def prepare_run(cfg: RunConfig) -> PreparedRun:
    """Make the run directory, split data into sites and a held-out set. Touches no model."""
    check_tracking(cfg)  # a [tracking] key on without its library: refused before anything
    if cfg.dp.enabled:  # settings whose accounting would not fit in memory or time
        check_dp_range(cfg.dp.noise_multiplier, cfg.dp.target_epsilon)
    task = resolve_task(cfg)
    run_id = new_run_name(cfg.output.run_name)
    run_dir = Path(cfg.output.dir) / run_id
    claim_run_dir(run_dir)
    layout = RunLayout(run_dir)
    records = load_source(cfg, task)
    check_file_records(records)  # every problem names file:line:key, before anything is written
    train, held = split_eval(cfg, records)
    if task == "classification" and not cfg.data.labels:
        labels = read_label_set(records, cfg.data.label_column)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": labels})})
    check_task_records([*records, *held.records], cfg, task, cfg.data.labels)
    parts, groups = _partition(cfg, train)
    rng = np.random.default_rng(cfg.data.seed + 2)
    sites = []
    # What the simulated sites opt into sending (common/disclosure.py)
    opted_in = frozenset({"train_loss"}) if cfg.federation.report_train_loss else frozenset()
    # by record and person count: sites of equal size plan alike
    planned: dict[tuple[int, UnitCounts], BudgetPlan] = {}
    created = not run_dir.exists()
    try:  # a run refused half-way (a site too small for its delta) leaves no run directory
        for k, idx in enumerate(parts):
            if cfg.data.max_records_per_site and len(idx) > cfg.data.max_records_per_site:
                idx = np.sort(rng.choice(idx, cfg.data.max_records_per_site, replace=False))
            units = _units(cfg, [train[i] for i in idx])
            if cfg.dp.enabled and (len(idx), units) not in planned:  # refuse what cannot fit
                size = f"{len(idx)} records" + (f", {units.persons} persons"
                                                if units.person_level else "")
                planned[len(idx), units] = plan_run(
                    cfg.dp, records=len(idx), batch_size=cfg.train.batch_size,
                    rounds=cfg.federation.rounds, local_steps=cfg.train.local_steps,
                    where=f"site-{k} ({size}): ", units=units,
                )
            site_dir = layout.site_dir(f"site-{k}")
            write_jsonl(site_dir / "data" / "train.jsonl", [train[i].fields for i in idx])
            sites.append(SiteSpec(f"site-{k}", site_dir / "data" / "train.jsonl",
                                  site_dir / "state", disclose=opted_in))
        eval_path = layout.eval_data
        write_jsonl(eval_path, [r.fields for r in held.records])
        layout.config.write_text(config_to_toml(cfg))
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return PreparedRun(cfg, run_id, run_dir, eval_path, sites, groups, held)


def measure_lengths(prepared: PreparedRun) -> LengthReport:
    """Token lengths of the records the run uses (the sites' and the evaluated ones) against
    model.max_length: how many are cut and how many tokens that loses. Loads the tokenizer."""
    from transformers import AutoTokenizer

    from fedtune.common.models import model_input_limit, resolve_model_path

    cfg = prepared.cfg
    path = resolve_model_path(cfg.model.name, cfg.model.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    records = [r for site in prepared.sites for r in read_records(site.data_path)]
    records += read_records(prepared.eval_path)
    return length_report(records, tokenizer, cfg, resolve_task(cfg),
                         model_input_limit(path, tokenizer))


LOCAL_RAY = "local"  # --ray-address local: a private Ray even where RAY_ADDRESS is set


def ray_address(option: str | None) -> str | None:
    """The Ray cluster to attach to: `--ray-address`, else Ray's own RAY_ADDRESS; None (or
    "local"): start a private Ray for this run, as before."""
    address = option if option is not None else os.environ.get("RAY_ADDRESS")
    address = (address or "").strip()
    return None if address in ("", LOCAL_RAY) else address


def _init_ray(init_args: dict) -> None:
    """Start Ray (or attach to a cluster: `address` in init_args) as Flower's RayBackend would
    (it skips its own init when Ray is up), so that the stop handler can be installed after
    ray.init replaced the SIGTERM handler."""
    import sys

    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)  # what Flower passes its workers
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    address = init_args.get("address")
    if address not in (None, LOCAL_RAY):
        _check_reachable(address)
    try:
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
    except (ConnectionError, RuntimeError, ValueError) as e:
        if address in (None, LOCAL_RAY):
            raise
        raise ValueError(f"cannot attach to the Ray cluster at {address} (--ray-address or "
                         f"RAY_ADDRESS): {e}") from None


def _check_reachable(address: str) -> None:
    """Fail in seconds, naming the address, when nothing answers at HOST:PORT (ray.init would
    retry for minutes). "auto" and ray:// addresses are left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        raise ValueError(f"cannot attach to the Ray cluster at {address} (--ray-address or "
                         f"RAY_ADDRESS): nothing answers there ({e}); start its head with "
                         f"`ray start --head --port={port}`") from None


def _attached_capacity() -> tuple[int, float]:
    """(CPUs, GPUs) of the attached cluster, all its nodes together."""
    import ray

    total = ray.cluster_resources()
    return int(total.get("CPU", 0)), float(total.get("GPU", 0))


def run_prepared(prepared: PreparedRun, listener: RoundListener | None = None,
                 verbose: bool = False,
                 on_stop: Callable[[str], None] | None = None,
                 address: str | None = None) -> list[dict]:
    """Run the federation with Flower's simulation engine; returns the metrics records.

    `address`: a running Ray cluster to attach to (see `ray_address`); its CPUs, not this
    machine's, then decide how many sites train at once, and the cluster is left running when
    the run ends or is stopped. Without it a private Ray is started and ended with the run.

    Ctrl-C or SIGTERM ends the run within seconds, Ray's processes included when they are this
    run's own (simulations/stopping.py); `on_stop(signal name)` runs first."""
    from flwr.simulation import run_simulation

    from fedtune.simulations import busy_node_dispatch, worker_deaths

    busy_node_dispatch.install()  # Flower polls all N nodes 10x a second; poll only those with mail
    # a dead Ray worker: its site named with the cause, the worker replaced
    worker_deaths.install(lambda partition_id: prepared.sites[partition_id].site_id)
    # Simulated sites have no site.toml: the same merge as a deployed site's, with no limits.
    cfg = site_run_config(prepared.cfg, SIMULATION_POLICY)
    ensure_cached(cfg.model.name, cfg.model.cache_dir)  # build once, before workers start
    log_args = {"include_dashboard": False,
                "logging_level": logging.INFO if verbose else logging.ERROR,
                "log_to_driver": verbose}
    same_priority_workers()  # Ray would run the sites at a lower priority than this command
    if address:  # the cluster's own resources: num_cpus / num_gpus must not be passed
        _init_ray({"address": address, **log_args})
        cpus, cluster_gpus = _attached_capacity()
        parallel = min(cfg.federation.parallel_sites or max(1, cpus), cfg.federation.num_sites)
        gpus = cluster_gpus / parallel if cluster_gpus else 0.0
        init_args: dict = {"address": address, **log_args}
    else:
        parallel = cfg.federation.parallel_sites or (os.cpu_count() or 1)
        parallel = min(parallel, cfg.federation.num_sites)
        gpus = 1.0 / parallel if torch.cuda.is_available() else 0.0
        # "local": a fresh Ray even where RAY_ADDRESS names a cluster
        init_args = {"address": LOCAL_RAY, "num_cpus": parallel, "num_gpus": 1 if gpus else 0,
                     **log_args}
    sites = prepared.sites

    def resolve_site(context) -> SiteSpec:
        return sites[int(context.node_config["partition-id"])]

    server_app = build_server_app(cfg, prepared.run_dir, prepared.run_id, prepared.eval_path,
                                  listener)
    client_app = build_client_app(cfg, resolve_site, secagg=cfg.federation.secagg,
                                  parallel_sites=parallel)
    # One CPU per site actor: Flower's pool holds as many actors as the nodes' CPUs allow.
    backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": gpus},
                      "init_args": init_args}
    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    try:
        _init_ray(backend_config["init_args"])
        with stop_on_signal(on_stop):
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=cfg.federation.num_sites,
                backend_config=backend_config,
            )
    finally:
        flwr_logger.setLevel(old_level)
        if address:  # leave the cluster as it was: only this driver disconnects
            import ray

            ray.shutdown()
    return read_metrics(prepared.run_dir)


def read_metrics(run_dir: Path) -> list[dict]:
    """The round records of a run directory's metrics.jsonl (a torn last line is skipped)."""
    return read_rounds(run_dir)
