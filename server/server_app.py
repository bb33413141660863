"""The coordinator: a Flower ServerApp on the legacy workflow path.

One code path for simulation and deployment: `DefaultWorkflow`, whose fit step is Flower's
`SecAggPlusWorkflow` when secure aggregation is on (in Flower 1.39 SecAgg+ exists only on this
path, with a `LegacyContext` and a legacy strategy; server/secagg.py's subclass of it also
survives a site lost before it shared its keys). It runs as server/workflow.py's resumable
variant: the server's state is saved after every round (server/state.py), `resume` continues
after the last completed round, and `federation.round_timeout_s` bounds every exchange.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig

from fedtune.common.config import RunConfig, secagg_threshold
from fedtune.common.data import read_records
from fedtune.common.loading import model_card
from fedtune.common.lora import adapter_layout
from fedtune.common.model_cache import get_runtime
from fedtune.common.run_layout import RunLayout
from fedtune.common.tasks import encode_records, num_labels, resolve_task
from fedtune.server.divergence import DivergenceWatch
from fedtune.server.participation import ParticipationGrid
from fedtune.server.recorder import RoundListener, RunRecorder
from fedtune.server.secagg import DropoutTolerantSecAggPlus, secagg_params
from fedtune.server.state import (
    prepare_resume,
    restore_strategy_state,
    save_state,
    state_after_round,
)
from fedtune.server.strategy import STRATEGIES
from fedtune.server.strategy.central_dp import with_central_dp
from fedtune.server.tracking import RoundTracker, check_tracking
from fedtune.server.validation import UpdateChecks
from fedtune.server.workflow import ResumableWorkflow, TimeoutGrid


def build_strategy(cfg: RunConfig, recorder: RunRecorder, initial) -> object:
    fed = cfg.federation
    if fed.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {fed.strategy!r}; choose one of: "
                         f"{', '.join(STRATEGIES)}")
    cls = STRATEGIES[fed.strategy]
    strategy = cls(
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
        **cls.config_kwargs(cfg, recorder.rt.model),
    )
    if cfg.central_dp.enabled:  # site-level DP: Flower's DP wrapper around the strategy
        strategy = with_central_dp(strategy, cfg, on_release=recorder.record_central_dp)
    strategy.on_round_info = recorder.record_aggregation  # aggregation time, bytes received
    strategy.on_site_replies = recorder.record_sites  # every site's status, refusals by name
    strategy.on_site_nodes = recorder.participation.learn  # node id -> name, for dropouts
    strategy.update_checks = UpdateChecks(  # server/validation.py, before aggregation
        max_norm=fed.max_update_norm, layout=adapter_layout(recorder.rt.model),
        secagg=bool(fed.secagg), min_updates=fed.min_fit_sites,
    )
    return strategy


def build_fit_workflow(cfg: RunConfig):
    """Flower's default fit step, or SecAgg+ (masked updates: the server sees only the sum)."""
    if not cfg.federation.secagg:
        return None
    n = cfg.federation.num_sites
    return DropoutTolerantSecAggPlus(
        num_shares=n, reconstruction_threshold=secagg_threshold(n),
        **secagg_params(n, clip=cfg.federation.secagg_clip,
                        max_records=cfg.federation.secagg_max_records),
    )


def build_server_app(
    cfg: RunConfig, run_dir: Path, run_id: str, eval_path: Path,
    listener: RoundListener | None = None, *, resume: bool = False,
    node_names: dict[int, str] | None = None,
) -> ServerApp:
    """The ServerApp; with `resume`, it continues the run in `run_dir` after its last completed
    round (server/state.py), with the same run id. `node_names` (node id -> site name, the
    coordinator's registrations) names a site that drops out of a round."""
    app = ServerApp()
    check_tracking(cfg)  # a tracking key on without its library: refused before any round

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        task = resolve_task(cfg)
        rt = get_runtime(cfg, task, num_labels(cfg, task))
        eval_data = encode_records(read_records(eval_path), rt.tokenizer, cfg, task,
                                   cfg.data.labels)
        point = prepare_resume(run_dir, run_id, rt.model) if resume else None
        # [tracking]: each round also to TensorBoard / MLflow (server/tracking.py)
        tracker = RoundTracker.open(cfg, run_dir, run_id, inner=listener)
        recorder = RunRecorder(run_dir, run_id, rt, eval_data, tracker,
                               num_rounds=cfg.federation.rounds,
                               evaluate_every=cfg.federation.evaluate_every,
                               model_card=model_card(cfg), divergence=DivergenceWatch(
                                   cfg, RunLayout(run_dir).metrics if resume else None,
                                   log_warning=listener is None),
                               node_names=node_names)
        strategy = build_strategy(cfg, recorder, point.adapter if point else rt.initial_adapter)
        if point is not None:
            restore_strategy_state(strategy, point.state.strategy)
        fed = cfg.federation
        legacy = LegacyContext(
            context, config=ServerConfig(num_rounds=fed.rounds, round_timeout=fed.round_timeout_s),
            strategy=strategy,
        )
        last = [point.state if point else None]

        def on_round_end(server_round: int, _ctx: LegacyContext) -> None:
            last[0] = state_after_round(run_dir, run_id, server_round, fed.rounds, strategy,
                                        last[0])
            save_state(run_dir, last[0])

        workflow = ResumableWorkflow(fit_workflow=build_fit_workflow(cfg),
                                     start_round=point.next_round if point else 1,
                                     on_round_end=on_round_end)
        bounded = TimeoutGrid(grid, fed.round_timeout_s) if fed.round_timeout_s else grid
        watched = ParticipationGrid(bounded, recorder.participation)  # names dropouts by site
        with tracker:  # closes the tracking runs, FAILED if the workflow raised
            workflow(watched, legacy)

    return app
