"""What the server keeps of a run: the global adapter after every round (PEFT format), held-out
evaluation, and one metrics JSON line per round (`metrics.jsonl`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Protocol

import numpy as np
from flwr.common import NDArrays, Scalar

from fedtune.common.data import EncodedDataset
from fedtune.common.lora import save_adapter, set_adapter
from fedtune.common.model_cache import ModelRuntime
from fedtune.common.run_layout import RunLayout
from fedtune.common.tasks import evaluate
from fedtune.server.divergence import DivergenceWatch
from fedtune.server.participation import RoundParticipation


class RoundListener(Protocol):
    """Progress display hooks (rich in the CLI; no-op in daemons)."""

    def round_started(self, server_round: int) -> None: ...
    def round_finished(self, record: dict) -> None: ...


class NullListener:
    def round_started(self, server_round: int) -> None:
        pass

    def round_finished(self, record: dict) -> None:
        pass


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line and fsync it, so a crash never loses a finished round's record."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class RunRecorder:
    def __init__(
        self,
        run_dir: Path,
        run_id: str,
        runtime: ModelRuntime,
        eval_data: EncodedDataset,
        listener: RoundListener | None = None,
        *,
        num_rounds: int,
        evaluate_every: int = 1,
        model_card: str | None = None,
        divergence: DivergenceWatch | None = None,
        node_names: dict[int, str] | None = None,
    ) -> None:
        self.model_card = model_card  # the adapter's README.md (common/loading.py)
        self.divergence = divergence  # server/divergence.py: a finding goes into the record
        self.run_dir = Path(run_dir)
        self.num_rounds = num_rounds
        self.evaluate_every = evaluate_every
        self.run_id = run_id
        self.rt = runtime
        self.eval_data = eval_data
        self.listener = listener or NullListener()
        self.layout = RunLayout(self.run_dir)
        self.metrics_path = self.layout.metrics
        self.adapter_dir = self.layout.adapter
        self._site_metrics: dict[int, list[dict]] = {}
        self._round_started: dict[int, float] = {}
        self._central_dp: dict[int, dict] = {}
        self._aggregation: dict[int, dict] = {}
        self._checkpoint_seconds: dict[int, float] = {}
        # Which sites trained, declined, were refused or dropped out, by name (node id -> name:
        # the coordinator's registrations, then the replies)
        self.participation = RoundParticipation(node_names)

    def fit_config(self, server_round: int, *, num_rounds: int, local_steps: int) -> dict:
        """Sent to every sampled site with the global adapter (Flower's on_fit_config_fn)."""
        self._round_started[server_round] = time.time()
        self.participation.round = server_round
        self.listener.round_started(server_round)
        return {
            "run_id": self.run_id,
            "server_round": server_round,
            "num_rounds": num_rounds,
            "local_steps": local_steps,
        }

    @staticmethod
    def aggregate_fit_metrics(replies: list[tuple[int, dict]]) -> dict[str, Scalar]:
        """Flower's fit_metrics_aggregation_fn: example-weighted training loss of the sites that
        sent one (train_loss is opt-in at each site, common/disclosure.py)."""
        trained = [(n, m) for n, m in replies if n > 0 and "train_loss" in m]
        total = sum(n for n, _ in trained)
        if not total:
            return {}
        return {"train_loss": sum(n * float(m["train_loss"]) for n, m in trained) / total}

    def after_aggregate(self, server_round: int, adapter: NDArrays, sites: list[dict]) -> None:
        """Checkpoint the new global adapter (atomically) in PEFT format."""
        started = time.perf_counter()
        self._site_metrics[server_round] = sites
        set_adapter(self.rt.model, adapter)
        save_adapter(self.rt.model, self.layout.checkpoint(server_round), self.model_card)
        save_adapter(self.rt.model, self.adapter_dir, self.model_card)
        self._checkpoint_seconds[server_round] = time.perf_counter() - started

    def record_sites(self, server_round: int, sites: list[dict]) -> None:
        """Every site's reply metrics (refusals too), written with the round even when no site
        trained."""
        self._site_metrics[server_round] = sites

    def record_aggregation(self, server_round: int, info: dict) -> None:
        """Aggregation time and bytes received from the sites (written with the round)."""
        self._aggregation[server_round] = info

    def record_central_dp(self, server_round: int, info: dict) -> None:
        """Site-level DP accountant after a released aggregate (written with the round)."""
        self._central_dp[server_round] = info

    def evaluates(self, server_round: int) -> bool:
        """Is the global adapter evaluated after this round? (federation.evaluate_every)"""
        return (server_round % self.evaluate_every == 0
                or server_round in (0, self.num_rounds))

    def evaluate(
        self, server_round: int, adapter: NDArrays, config: dict
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Flower's evaluate_fn: held-out metrics of the global adapter (round 0 = before).

        Writes the round's metrics line either way; returns None (Flower: not evaluated) on a
        round that `evaluates` skips."""
        started = time.perf_counter()
        metrics = None
        if self.evaluates(server_round):
            set_adapter(self.rt.model, adapter)
            metrics = evaluate(self.rt.model, self.eval_data, self.rt.task, self.rt.pad_id,
                               self.rt.device)
        evaluate_seconds = time.perf_counter() - started
        sites = sorted(
            self._site_metrics.pop(server_round, []), key=lambda m: str(m.get("site_id"))
        )
        # Sites that trained and chose to send their loss (opt-in, common/disclosure.py)
        trained = [m for m in sites if m.get("status") == "ok" and "train_loss" in m]
        n = sum(int(m.get("records", 0)) for m in trained)
        record = {
            "run_id": self.run_id,
            "round": server_round,
            **({"eval": metrics} if metrics is not None else {}),
            "train_loss": (
                float(sum(m["train_loss"] * int(m["records"]) for m in trained) / n) if n else None
            ),
            "sites": sites,
            **({"participation": self.participation.for_round(server_round, sites)}
               if server_round > 0 else {}),
            "round_seconds": (
                time.time() - self._round_started[server_round]
                if server_round in self._round_started else None
            ),
            "adapter_norm": float(np.sqrt(sum(float(np.sum(a * a)) for a in adapter))),
            # Where the server's time went (sites do not send their timings)
            "evaluate_seconds": evaluate_seconds,
            **({"checkpoint_seconds": self._checkpoint_seconds.pop(server_round)}
               if server_round in self._checkpoint_seconds else {}),
            **({"central_dp": self._central_dp.pop(server_round)}
               if server_round in self._central_dp else {}),
            **({"aggregation": self._aggregation.pop(server_round)}
               if server_round in self._aggregation else {}),
            "time": time.time(),
        }
        finding = (self.divergence.check(server_round, metrics, adapter)
                   if self.divergence is not None else None)
        if finding:
            record["divergence"] = finding
        append_jsonl(self.metrics_path, record)
        self.listener.round_finished(record)
        if metrics is None:
            return None
        return float(metrics["loss"]), {k: float(v) for k, v in metrics.items()}
