"""Flower's legacy `DefaultWorkflow`, made resumable and bounded in time.

- `ResumableWorkflow` runs rounds `start_round..num_rounds` (Flower's always starts at 1) and
  calls `on_round_end(round)` after each completed round (and after the initial evaluation,
  round 0), where the server persists its state (server/state.py). A resumed run takes its
  global adapter from the strategy's initial parameters and skips the initial evaluation.
- `TimeoutGrid` gives every `send_and_receive` of the workflow a default timeout
  (`federation.round_timeout_s`): Flower 1.39's default fit step waits without limit, and
  SecAgg+'s four stages each take the same timeout. A site that does not reply in time is a
  failure (a dropout for SecAgg+); the round goes on with the replies it has.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord, Context, Message
from flwr.common import log
from flwr.server import Grid, LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_centralized_evaluation_workflow,
    default_init_params_workflow,
)

OnRoundEnd = Callable[[int, LegacyContext], None]


class TimeoutGrid:
    """A Grid whose `send_and_receive` waits at most `timeout` seconds unless told otherwise."""

    def __init__(self, grid: Grid, timeout: float) -> None:
        self._grid = grid
        self.timeout = timeout

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(
            messages, timeout=self.timeout if timeout is None else timeout
        )

    def __getattr__(self, name: str) -> Any:  # everything else: the real grid
        return getattr(self._grid, name)


class ResumableWorkflow(DefaultWorkflow):
    def __init__(self, fit_workflow=None, evaluate_workflow=None, *, start_round: int = 1,
                 on_round_end: OnRoundEnd | None = None) -> None:
        super().__init__(fit_workflow=fit_workflow, evaluate_workflow=evaluate_workflow)
        self.start_round = start_round
        self.on_round_end = on_round_end

    def _round_done(self, server_round: int, context: LegacyContext) -> None:
        if self.on_round_end is not None:
            self.on_round_end(server_round, context)

    def __call__(self, grid: Grid, context: Context) -> None:
        if not isinstance(context, LegacyContext):
            raise TypeError(f"Expect a LegacyContext, but get {type(context).__name__}.")
        num_rounds = context.config.num_rounds
        if self.start_round > num_rounds:
            log(INFO, "[RESUME] all %s rounds were already completed; nothing to do", num_rounds)
            return
        thread, f_stop, c_done = start_update_client_manager_thread(grid, context.client_manager)
        c_done.wait()
        try:
            if self.start_round <= 1:
                log(INFO, "[INIT]")
                default_init_params_workflow(grid, context)
                self._round_done(0, context)
            else:
                log(INFO, "[RESUME] continuing at round %s of %s", self.start_round, num_rounds)
                params = context.strategy.initialize_parameters(
                    client_manager=context.client_manager
                )
                if params is None:
                    raise RuntimeError("a resumed run needs the strategy's initial parameters")
                context.state.array_records[MAIN_PARAMS_RECORD] = (
                    compat.parameters_to_arrayrecord(params, keep_input=True)
                )
            start_time = timeit.default_timer()
            cfg = ConfigRecord()
            cfg[Key.START_TIME] = start_time
            context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
            for current_round in range(max(1, self.start_round), num_rounds + 1):
                log(INFO, "")
                log(INFO, "[ROUND %s]", current_round)
                cfg[Key.CURRENT_ROUND] = current_round
                self.fit_workflow(grid, context)
                default_centralized_evaluation_workflow(grid, context)
                self.evaluate_workflow(grid, context)
                self._round_done(current_round, context)
            log(INFO, "")
            log(INFO, "[SUMMARY] rounds %s..%s finished in %.2fs", max(1, self.start_round),
                num_rounds, timeit.default_timer() - start_time)
        finally:
            f_stop.set()
            thread.join()
