"""The coordinator's Flower ServerApp in a deployment: `server.flower_app:app`.

`fedtune server` prepares the run directory, then submits a small Flower app (server/
coordinator.py) whose run config carries the effective run configuration as JSON
(`fedtune-config`) and the run's name (`fedtune-run-name`). The SuperLink starts this ServerApp,
which builds the same ServerApp as `fedtune simulate` (`server.app.build_server_app`).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.server import Grid, ServerApp

from common.config import RunConfig

RUN_CONFIG_KEY = "fedtune-config"
RUN_NAME_KEY = "fedtune-run-name"
RESUME_KEY = "fedtune-resume"  # true: continue the run after its last completed round

app = ServerApp()


def run_paths(cfg: RunConfig, run_name: str) -> tuple[Path, Path]:
    """(run directory, held-out evaluation file) of a deployed run."""
    run_dir = Path(cfg.output.dir) / run_name
    return run_dir, run_dir / "eval.jsonl"


@app.main()
def main(grid: Grid, context: Context) -> None:
    from server.app import build_server_app  # torch, transformers

    cfg = RunConfig.model_validate_json(str(context.run_config[RUN_CONFIG_KEY]))
    run_name = str(context.run_config[RUN_NAME_KEY])
    run_dir, eval_path = run_paths(cfg, run_name)
    resume = bool(context.run_config.get(RESUME_KEY, False))
    build_server_app(cfg, run_dir, run_name, eval_path, resume=resume)(grid, context)
