"""The coordinator: a Flower ServerApp on the legacy workflow path.

One code path for simulation and deployment: `DefaultWorkflow`, whose fit step is Flower's
`SecAggPlusWorkflow` when secure aggregation is on (in Flower 1.39 SecAgg+ exists only on this
path, with a `LegacyContext` and a legacy strategy).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from common.config import RunConfig
from common.data import read_records
from common.lora import get_adapter
from common.runtime import get_runtime
from common.tasks import encode_records, num_labels, resolve_task
from server.recorder import RoundListener, RunRecorder
from server.strategy import STRATEGIES


def build_strategy(cfg: RunConfig, recorder: RunRecorder, initial) -> object:
    fed = cfg.federation
    return STRATEGIES[fed.strategy](
        fraction_fit=fed.fraction_fit,
        min_fit_clients=fed.min_fit_sites,
        min_available_clients=fed.num_sites,
        fraction_evaluate=0.0,  # evaluation is central, on the server's held-out split
        min_evaluate_clients=0,
        accept_failures=True,
        initial_parameters=ndarrays_to_parameters(initial),
        evaluate_fn=recorder.evaluate,
        fit_metrics_aggregation_fn=recorder.aggregate_fit_metrics,
        on_fit_config_fn=partial(
            recorder.fit_config, num_rounds=fed.rounds, local_steps=cfg.train.local_steps
        ),
        after_aggregate=recorder.after_aggregate,
    )


def build_fit_workflow(cfg: RunConfig):
    """Flower's default fit step, or SecAgg+ (masked updates: the server sees only the sum)."""
    if not cfg.federation.secagg:
        return None
    n = cfg.federation.num_sites
    return SecAggPlusWorkflow(num_shares=n, reconstruction_threshold=max(2, (2 * n) // 3))


def build_server_app(
    cfg: RunConfig, run_dir: Path, run_id: str, eval_path: Path,
    listener: RoundListener | None = None,
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        task = resolve_task(cfg)
        rt = get_runtime(cfg, task, num_labels(cfg, task))
        eval_data = encode_records(read_records(eval_path), rt.tokenizer, cfg, task,
                                   cfg.data.labels)
        recorder = RunRecorder(run_dir, run_id, rt, eval_data, listener)
        strategy = build_strategy(cfg, recorder, get_adapter(rt.model))
        legacy = LegacyContext(
            context, config=ServerConfig(num_rounds=cfg.federation.rounds), strategy=strategy
        )
        DefaultWorkflow(fit_workflow=build_fit_workflow(cfg))(grid, legacy)

    return app
