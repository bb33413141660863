"""The run configuration: one pydantic model tree, loaded from TOML and overridden from the CLI.

Every section forbids unknown keys, so a typo is an error that names the key instead of a
silently ignored setting. `load_config` is the one front door.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, with a message that names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which pretrained model to fine-tune and where it runs."""

    # An embedded name ("smollm2-135m-instruct", "all-minilm-l6-v2"), a local HF directory,
    # or a hub id (needs a reachable hub).
    name: str = "smollm2-135m-instruct"
    max_length: int = Field(96, gt=8, le=8192)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Where dequantized/converted embedded models are cached (default: ~/.cache/fedtune).
    cache_dir: Path | None = None


class TaskConfig(_Section):
    """What is learned: instruction tuning of a causal LM, or text classification."""

    kind: Literal["auto", "causal_lm", "classification"] = "auto"


class LoraSettings(_Section):
    """LoRA hyper-parameters (PEFT's LoraConfig)."""

    r: int = Field(8, gt=0, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # None: PEFT's default for the architecture (q/v projections for Llama, query/value for BERT).
    target_modules: list[str] | None = None
    # Seed of the random A matrices; identical at every site so that all start from one adapter.
    init_seed: int = 0


class DPConfig(_Section):
    """Sample-level DP-SGD at each site (Opacus)."""

    enabled: bool = True
    # Give either a noise multiplier or a target epsilon (noise is then calibrated for the
    # whole planned run: rounds x local steps).
    noise_multiplier: float | None = Field(None, ge=0)
    target_epsilon: float | None = Field(8.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    accountant: Literal["rdp", "prv"] = "rdp"

    @model_validator(mode="after")
    def _noise_or_target(self) -> DPConfig:
        if self.enabled and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("set dp.noise_multiplier or dp.target_epsilon (or dp.enabled = false)")
        return self


class TrainConfig(_Section):
    """Local training at a site, per round."""

    local_steps: int = Field(3, gt=0)
    # Expected batch size; with DP the batches are Poisson-sampled at rate batch_size / records.
    batch_size: int = Field(8, gt=0)
    lr: float = Field(2e-3, gt=0)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    # Torch threads per site process; 0 means "cores / parallel sites".
    threads: int = Field(0, ge=0)


class FederationConfig(_Section):
    """The federation: how many sites, rounds and how the server aggregates."""

    num_sites: int = Field(3, gt=0)
    rounds: int = Field(2, gt=0)
    strategy: Literal["fedavg"] = "fedavg"
    fraction_fit: float = Field(1.0, gt=0, le=1)
    min_fit_sites: int = Field(1, gt=0)
    # Flower SecAgg+ (deployment issue). Off in simulation by default.
    secagg: bool = False
    # Sites trained in parallel in simulation (Ray actors); 0 = number of CPU cores.
    parallel_sites: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _min_le_sites(self) -> FederationConfig:
        if self.min_fit_sites > self.num_sites:
            raise ValueError(
                f"min_fit_sites ({self.min_fit_sites}) > num_sites ({self.num_sites}): "
                "lower federation.min_fit_sites or raise federation.num_sites"
            )
        return self


class DataConfig(_Section):
    """Where the data comes from and how it is split into sites."""

    # "demo" (made by fedtune), or a .jsonl / .csv file.
    train: str = "demo"
    # A held-out file for server-side evaluation; None: hold out eval_fraction of `train`.
    eval: str | None = None
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    max_eval_records: int = Field(64, gt=0)
    # Cap on records per site after partitioning (keeps CPU runs short); None = no cap.
    max_records_per_site: int | None = Field(None, gt=0)
    # Instruction data: keys of prompt and response ({"messages": [...]} is detected as chat).
    input_key: str = "input"
    output_key: str = "output"
    # Classification data.
    text_column: str = "text"
    label_column: str = "label"
    labels: list[str] | None = None
    # Partitioning in simulation.
    partition: Literal["iid", "dirichlet", "column"] = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0)
    partition_column: str | None = None
    demo_records: int = Field(600, gt=10)
    seed: int = 0


class OutputConfig(_Section):
    dir: Path = Path("runs")
    run_name: str | None = None


class RunConfig(_Section):
    """Everything a federated run needs."""

    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    lora: LoraSettings = LoraSettings()
    dp: DPConfig = DPConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()
    data: DataConfig = DataConfig()
    output: OutputConfig = OutputConfig()
    seed: int = 0

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.data.partition == "column" and not self.data.partition_column:
            raise ValueError("data.partition = 'column' needs data.partition_column")
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _parse_value(raw: str) -> Any:
    """A CLI value as TOML would read it (3, 1e-5, true, [..]); anything else is a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. dp.target_epsilon=3")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw.strip())
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML file (optional), apply overrides, validate. Errors name file and key."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + --set overrides"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def config_to_toml(cfg: RunConfig) -> str:
    """The effective config as TOML (for `fedtune config show` and the run directory)."""
    out: list[str] = []
    top = cfg.model_dump(mode="json", exclude_none=True)
    for key, value in top.items():
        if not isinstance(value, dict):
            out.append(f"{key} = {_toml_value(value)}")
    for key, value in top.items():
        if isinstance(value, dict):
            out.append(f"\n[{key}]")
            out.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
    return "\n".join(out).lstrip() + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'
