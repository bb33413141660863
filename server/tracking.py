"""Experiment tracking: each round's record (server/recorder.py) also goes to TensorBoard and/or
MLflow, for operators who follow runs in those tools.

Off by default; `[tracking] tensorboard = true` and `[tracking] mlflow = true` (or `mlflow_uri`)
turn each on. Both libraries are the optional extra `fedtune[tracking]`; a key that is on
without its library fails at the start of the run (`check_tracking`), not after the first
round. Tracking only mirrors metrics.jsonl, which stays the run's record: a sink that fails
during the run (an MLflow server gone) is dropped with a warning and the run goes on.

What is logged, per round (step = round): the held-out metrics (`eval/<name>`), the sites'
example-weighted training loss (`train/loss`, from sites that opt in to sending it), each
site's ε as it reported it (`epsilon/<site>`), how many sites trained (`sites/ok`), the
round's seconds, the global adapter's norm, aggregation and central-DP numbers. At the start:
the effective configuration (MLflow params, a TensorBoard text).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from fedtune.common.config import ConfigError, RunConfig, config_to_toml

if TYPE_CHECKING:  # server/recorder.py imports torch: not needed to check the configuration
    from fedtune.server.recorder import RoundListener

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # <run dir>/tensorboard/
MLFLOW_DB = "mlflow.db"  # <run dir>/mlflow.db: the default MLflow store
MLFLOW_ARTIFACTS = "mlflow-artifacts"  # the default store's artifact root (nothing is logged)
RUN_ID_TAG = "fedtune.run_id"
INSTALL = "pip install 'fedtune[tracking]'"
MLFLOW_PARAM_MAX = 500  # characters of a param value kept (MLflow refuses longer ones)
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. ]")


def tensorboard_dir(run_dir: Path) -> Path:
    """Where `tracking.tensorboard` writes its event files."""
    return Path(run_dir) / TENSORBOARD_DIR


def mlflow_uri(cfg: RunConfig, run_dir: Path) -> str:
    """The MLflow tracking URI: `tracking.mlflow_uri`, else a SQLite store in the run dir."""
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    return f"sqlite:///{(Path(run_dir) / MLFLOW_DB).resolve()}"


def check_tracking(cfg: RunConfig) -> None:
    """Refuse a tracking key that is on without its library, naming the key and the fix."""
    missing = []
    if cfg.tracking.tensorboard and importlib.util.find_spec("tensorboard") is None:
        missing.append(("tracking.tensorboard", "tensorboard"))
    if cfg.tracking.mlflow_enabled and importlib.util.find_spec("mlflow") is None:
        key = "tracking.mlflow_uri" if cfg.tracking.mlflow_uri else "tracking.mlflow"
        missing.append((key, "mlflow (mlflow-skinny)"))
    if missing:
        keys = " and ".join(k for k, _ in missing)
        libs = " and ".join(lib for _, lib in missing)
        raise ConfigError(f"{keys} is on but {libs} is not installed: run `{INSTALL}` "
                          f"(or turn {keys} off)")


def flat_config(cfg: RunConfig) -> dict[str, str]:
    """The effective configuration as `section.key` -> text (unset keys left out)."""
    out: dict[str, str] = {}
    for section, values in cfg.model_dump(mode="json").items():
        if not isinstance(values, dict):
            if values is not None:
                out[section] = str(values)
            continue
        for key, value in values.items():
            if value is not None:
                out[f"{section}.{key}"] = str(value)
    return out


def round_scalars(record: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl record worth plotting, by tracking name."""
    out: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)

    for key, value in (record.get("eval") or {}).items():
        put(f"eval/{key}", value)
    put("train/loss", record.get("train_loss"))
    put("round/seconds", record.get("round_seconds"))
    put("round/evaluate_seconds", record.get("evaluate_seconds"))
    put("round/checkpoint_seconds", record.get("checkpoint_seconds"))
    put("adapter_norm", record.get("adapter_norm"))
    sites = record.get("sites") or []
    if sites:
        put("sites/ok", sum(1 for s in sites if s.get("status") == "ok"))
    for site in sites:
        site_name = _UNSAFE.sub("_", str(site.get("site_id")))  # MLflow's allowed characters
        put(f"epsilon/{site_name}", site.get("epsilon"))  # as the site reported it
    for section in ("aggregation", "central_dp"):
        for key, value in (record.get(section) or {}).items():
            put(f"{section}/{key}", value)
    return out


class Sink(Protocol):
    """One tracking backend."""

    name: str

    def log_round(self, server_round: int, scalars: dict[str, float]) -> None: ...
    def close(self, status: str) -> None: ...


class TensorBoardSink:
    """Scalars per round in TensorBoard event files (torch's SummaryWriter)."""

    name = "tensorboard"

    def __init__(self, cfg: RunConfig, run_dir: Path, run_id: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(tensorboard_dir(run_dir)))
        self.writer.add_text("config", "```toml\n" + config_to_toml(cfg) + "```", 0)

    def log_round(self, server_round: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, server_round)
        self.writer.flush()  # a round is visible at once, and survives a crash

    def close(self, status: str) -> None:
        self.writer.close()


class MLflowSink:
    """One MLflow run per fedtune run (tagged with its id, so a resumed run continues it)."""

    name = "mlflow"

    def __init__(self, cfg: RunConfig, run_dir: Path, run_id: str) -> None:
        # A tool for private data does not phone home unless its operator says so.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        for noisy in ("mlflow", "alembic"):  # a new store's table creation logs at INFO
            logging.getLogger(noisy).setLevel(logging.WARNING)
        name = cfg.tracking.mlflow_experiment
        with warnings.catch_warnings():  # SQLAlchemy's deprecations of MLflow's own queries
            warnings.simplefilter("ignore", DeprecationWarning)
            self.client = MlflowClient(tracking_uri=mlflow_uri(cfg, run_dir))
            exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            exp_id = exp.experiment_id
        elif cfg.tracking.mlflow_uri:  # the server's default artifact root
            exp_id = self.client.create_experiment(name)
        else:  # the run directory's own store keeps its (empty) artifact root next to it
            exp_id = self.client.create_experiment(
                name, artifact_location=(Path(run_dir) / MLFLOW_ARTIFACTS).resolve().as_uri())
        found = self.client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'", max_results=1)
        if found:  # `--resume`: the same MLflow run
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(exp_id, run_name=run_id, tags={RUN_ID_TAG: run_id})
        self.run_id = run.info.run_id
        params = [Param(k, v[:MLFLOW_PARAM_MAX]) for k, v in flat_config(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_round(self, server_round: int, scalars: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, server_round) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


SINKS: tuple[tuple[str, type], ...] = (("tensorboard", TensorBoardSink), ("mlflow", MLflowSink))


class RoundTracker:
    """A RoundListener that passes each round to the progress display (`inner`) and to the
    configured sinks; as a context manager it closes them (MLflow: FINISHED or FAILED)."""

    def __init__(self, sinks: list[Sink], inner: RoundListener | None = None) -> None:
        self.sinks = sinks
        self.inner = inner

    @classmethod
    def open(cls, cfg: RunConfig, run_dir: Path, run_id: str,
             inner: RoundListener | None = None) -> RoundTracker:
        """Start the sinks that `cfg.tracking` turns on (none: a plain pass-through)."""
        check_tracking(cfg)
        on = {"tensorboard": cfg.tracking.tensorboard, "mlflow": cfg.tracking.mlflow_enabled}
        sinks: list[Sink] = []
        for name, sink in SINKS:
            if not on[name]:
                continue
            try:
                sinks.append(sink(cfg, Path(run_dir), run_id))
            except Exception as e:  # e.g. an MLflow server that does not answer
                log.warning("tracking: %s could not start (%s); this run is not tracked "
                            "there, metrics.jsonl has every round", name, e)
        return cls(sinks, inner)

    def round_started(self, server_round: int) -> None:
        if self.inner is not None:
            self.inner.round_started(server_round)

    def round_finished(self, record: dict) -> None:
        if self.inner is not None:
            self.inner.round_finished(record)
        scalars = round_scalars(record)
        for sink in list(self._each()):
            try:
                sink.log_round(int(record["round"]), scalars)
            except Exception as e:  # tracking mirrors metrics.jsonl: never stop the run for it
                log.warning("tracking: %s failed (%s); no more rounds go there, "
                            "metrics.jsonl has them all", sink.name, e)
                self.sinks.remove(sink)

    def close(self, status: str = "FINISHED") -> None:
        """Close every sink (idempotent)."""
        for sink in self._each():
            try:
                sink.close(status)
            except Exception as e:
                log.warning("tracking: closing %s failed (%s)", sink.name, e)
        self.sinks = []

    def _each(self) -> Iterator[Sink]:
        yield from list(self.sinks)

    def __enter__(self) -> RoundTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close("FINISHED" if exc_type is None else "FAILED")
