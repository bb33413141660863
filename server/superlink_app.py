"""The coordinator's Flower ServerApp in a deployment: `server.superlink_app:app`.

`fedtune server` prepares the run directory, then submits a small Flower app (server/
coordinator.py) whose run config carries the effective run configuration as JSON
(`fedtune-config`) and the run's name (`fedtune-run-name`). The SuperLink starts this ServerApp,
which builds the same ServerApp as `fedtune simulate` (`server.server_app.build_server_app`).
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context
from flwr.server import Grid, ServerApp

from fedtune.common.config import RunConfig
from fedtune.common.protocol import RESUME_KEY, RUN_CONFIG_KEY, RUN_NAME_KEY, SITE_NODES_KEY
from fedtune.common.run_layout import RunLayout

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedtune.server.run_log import plain_flower_logging

    plain_flower_logging()  # each line once, no colour codes in the log the SuperLink keeps
    from fedtune.server.server_app import build_server_app  # torch, transformers

    cfg = RunConfig.model_validate_json(str(context.run_config[RUN_CONFIG_KEY]))
    run_name = str(context.run_config[RUN_NAME_KEY])
    run_dir = Path(cfg.output.dir) / run_name
    eval_path = RunLayout(run_dir).eval_data
    resume = bool(context.run_config.get(RESUME_KEY, False))
    nodes = {int(k): str(v) for k, v in
             json.loads(str(context.run_config.get(SITE_NODES_KEY) or "{}")).items()}
    build_server_app(cfg, run_dir, run_name, eval_path, resume=resume,
                     node_names=nodes)(grid, context)
