"""A deployed run's directory and the Flower app that `fedtune server` submits.

The coordinator writes the effective configuration and its held-out evaluation split into the
run directory (common/run_layout.py), or, with `--resume`, reopens an interrupted run after
checking that the configuration is the one it started with. The Flower app it submits is only a
pyproject.toml: its components are fedtune's installed modules, its run config the fedtune
configuration as JSON (common/protocol.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from fedtune.common.config import ConfigError, RunConfig, config_to_toml, load_config
from fedtune.common.data import Record, read_label_set, write_jsonl
from fedtune.common.protocol import (
    CLIENT_APP_COMPONENT,
    RESUME_KEY,
    RUN_CONFIG_KEY,
    RUN_NAME_KEY,
    SERVER_APP_COMPONENT,
    SITE_NODES_KEY,
)
from fedtune.common.run_layout import RunLayout, claim_run_dir, new_run_name
from fedtune.common.splits import load_source, split_eval
from fedtune.common.tasks import resolve_task

APP_NAME = "fedtune-run"


@dataclass
class PreparedDeployment:
    cfg: RunConfig
    run_name: str
    run_dir: Path
    eval_path: Path
    resume: bool = False  # `--resume`: continue after the last completed round
    resumed_after: int | None = None  # that round (None: none completed, start at round 1)
    # {node id: site name} of the registered sites (server/participation.py names dropouts)
    site_nodes: dict[int, str] = field(default_factory=dict)


def deployment_config(cfg: RunConfig) -> RunConfig:
    """The run configuration as deployed: SecAgg+ on unless explicitly off, absolute paths."""
    data = cfg.model_dump(mode="json")
    if data["federation"].get("secagg") is None:
        data["federation"]["secagg"] = True
    data["output"]["dir"] = str(Path(cfg.output.dir).expanduser().resolve())
    try:
        return RunConfig.model_validate(data)
    except Exception as e:  # pydantic ValidationError: cross-checks that involve SecAgg+
        raise ConfigError(f"invalid configuration for a deployment: {e}") from None


def _heldout(cfg: RunConfig, task: str) -> tuple[list[Record], list[Record]]:
    """(records that define the label set, held-out evaluation records) at the coordinator."""
    if cfg.data.eval:
        _, held = split_eval(cfg, [])  # the whole file unless data.max_eval_records caps it
        return held.records, held.records
    if cfg.data.train == "demo" or Path(cfg.data.train).is_file():
        records = load_source(cfg, task)
        _, held = split_eval(cfg, records)
        return records, held.records
    raise ConfigError(
        "the coordinator needs a held-out evaluation file: set data.eval (the sites' training "
        "data stays at the sites)"
    )


def _flat(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_paths(cfg: RunConfig, run_name: str) -> tuple[Path, Path]:
    """(run directory, held-out evaluation file) of a deployed run."""
    run_dir = Path(cfg.output.dir) / run_name
    return run_dir, RunLayout(run_dir).eval_data


def _latest_run(out_dir: Path) -> str:
    runs = ([d for d in out_dir.iterdir() if RunLayout(d).config.is_file()]
            if out_dir.is_dir() else [])
    if not runs:
        raise ConfigError(f"--resume: no run to resume in {out_dir}; name it with "
                          "--set output.run_name=RUN")
    return max(runs, key=lambda d: d.stat().st_mtime).name


def _prepare_resume(cfg: RunConfig) -> PreparedDeployment:
    """`fedtune server --resume`: the existing run directory, with its own configuration."""
    from fedtune.server.state import load_state

    run_name = cfg.output.run_name or _latest_run(Path(cfg.output.dir))
    run_dir, eval_path = run_paths(cfg, run_name)
    stored_path = RunLayout(run_dir).config
    if not stored_path.is_file() or not eval_path.is_file():
        raise ConfigError(f"--resume: {run_dir} holds no fedtune run (no config.toml / "
                          "eval.jsonl); start it without --resume")
    stored = deployment_config(load_config(stored_path))
    given = cfg
    if not given.data.labels:
        given = given.model_copy(update={"data": given.data.model_copy(
            update={"labels": stored.data.labels})})
    a = _flat(stored.model_dump(mode="json"))
    b = _flat(given.model_dump(mode="json"))
    differ = [k for k in sorted(set(a) | set(b)) if k != "output.run_name" and a.get(k) != b.get(k)]
    if differ:
        raise ConfigError(
            f"--resume continues run {run_name!r} with the configuration it started with "
            f"({stored_path}), but this one differs in: "
            + ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in differ)
            + ". Resume with the same settings (e.g. --config " + str(stored_path) + ")"
        )
    state = load_state(run_dir)
    return PreparedDeployment(stored, run_name, run_dir, eval_path, resume=True,
                              resumed_after=state.round if state else None)


def prepare_deployment(cfg: RunConfig, *, resume: bool = False) -> PreparedDeployment:
    cfg = deployment_config(cfg)
    if resume:
        return _prepare_resume(cfg)
    task = resolve_task(cfg)
    run_name = new_run_name(cfg.output.run_name)
    run_dir, eval_path = run_paths(cfg, run_name)
    claim_run_dir(run_dir)
    label_source, held = _heldout(cfg, task)
    if task == "classification" and not cfg.data.labels:
        labels = read_label_set(label_source, cfg.data.label_column)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": labels})})
    run_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(eval_path, [r.fields for r in held])
    RunLayout(run_dir).config.write_text(config_to_toml(cfg))
    return PreparedDeployment(cfg, run_name, run_dir, eval_path)


def write_flower_app(directory: Path, prepared: PreparedDeployment) -> Path:
    """A minimal Flower app: its components are fedtune's module-level apps (installed in the
    environment of the SuperLink and of every SuperNode), its run config the fedtune config."""
    directory.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": APP_NAME,
            "version": "1.0.0",
            "description": "A fedtune federated DP-LoRA run (generated by `fedtune server`).",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {"flwr": {"app": {
            "publisher": "fedtune",
            "components": {
                "serverapp": SERVER_APP_COMPONENT,
                "clientapp": CLIENT_APP_COMPONENT,
            },
            "config": {
                RUN_CONFIG_KEY: prepared.cfg.model_dump_json(),
                RUN_NAME_KEY: prepared.run_name,
                RESUME_KEY: prepared.resume,
                SITE_NODES_KEY: json.dumps({str(k): v for k, v in prepared.site_nodes.items()}),
            },
        }}},
    }
    path = directory / "pyproject.toml"
    path.write_text(tomli_w.dumps(project), encoding="utf-8")
    (directory / "README.md").write_text(
        "Generated by `fedtune server` for one run; the code is the installed fedtune package.\n"
    )
    return directory
