"""The run configuration: one pydantic model tree, loaded from TOML and overridden from the CLI.

Every section forbids unknown keys, so a typo is an error that names the key instead of a
silently ignored setting. `load_config` is the one front door.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fedtune.common.strategy_traits import STRATEGY_NAMES, STRATEGY_TRAITS


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
    # Classification: sentence vector fed to the classifier. "auto": what the model declares
    # (sentence-transformers' 1_Pooling config: mean for the embedded MiniLM), else "cls"
    # (Hugging Face's [CLS] + pooler head). See common/heads.py.
    pooling: Literal["auto", "cls", "mean"] = "auto"
    # Classification: the classifier's starting weights. "label_names": each class's row is the
    # sentence vector of its label name (zero-shot start; needs mean pooling); "random": seeded
    # by lora.init_seed; "auto": label_names on a mean-pooling head when every label has a
    # letter in it (names, not numeric codes), else random. See common/heads.py.
    head_init: Literal["auto", "random", "label_names"] = "auto"


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
    # C: each record's gradient is clipped to L2 norm C. With DP off, each step's (mean)
    # gradient is clipped to C as a whole, so step sizes mean the same with DP on or off.
    max_grad_norm: float = Field(1.0, gt=0)
    # Accountant that plans and enforces the budget; the ledger records both RDP and PRV.
    accountant: Literal["rdp", "prv"] = "rdp"
    # The site's privacy budget over all runs in its ledger (None: only the per-run target).
    # A round that would take the site's total epsilon above it is declined.
    max_epsilon: float | None = Field(None, gt=0)
    # false (default): each site draws its Poisson batches and its noise from OS entropy, secret
    # even from the coordinator. true: from the run's `seed` (reproducible simulations and
    # benchmarks only): the guarantee then does not hold against whoever knows the seed, and the
    # report says so. A deployed site ignores it (client/supernode_app.py).
    reproducible_seed: bool = False

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
    # AdamW's step size, or "auto": 0.05 / sqrt(rounds x local_steps) with DP (the noise then
    # moves each weight about as far however long the run), 0.05 / (rounds x local_steps, at
    # least 4) without (common/step_size.py).
    # The run's config.toml then holds the number and lr_rule = "auto".
    lr: float | Literal["auto"] = Field(2e-3)
    lr_rule: Literal["fixed", "auto"] = "fixed"
    # Step size of a head trained in full next to LoRA (a classifier, PEFT modules_to_save);
    # None: `lr`. With DP-SGD (plain SGD) one step size cannot fit both: at init on Banking77
    # the head's per-example gradient is ~18x LoRA's, so a step size that moves the head lets
    # the noise (the same size on every coordinate) wreck the LoRA matrices.
    head_lr: float | None = Field(None, gt=0)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    # Torch threads per site process; 0 means "cores / parallel sites".
    threads: int = Field(0, ge=0)
    # A batch runs as chunks of examples of similar length, each padded only to its own longest
    # and holding at least this many real tokens (common/data.py::length_chunks): the same
    # examples and gradients, less compute on padding. 0: the whole batch in one pass.
    chunk_tokens: int = Field(1024, ge=0)

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, v: float | str) -> float | str:
        if v != "auto" and v <= 0:
            raise ValueError('must be > 0 (or "auto")')
        return v


StrategyName = Literal[STRATEGY_NAMES]  # type: ignore[valid-type]


class FederationConfig(_Section):
    """The federation: how many sites, rounds and how the server aggregates."""

    num_sites: int = Field(3, gt=0)
    rounds: int = Field(2, gt=0)
    # One of STRATEGY_NAMES; see server/strategy/ (one file per method, with its paper).
    strategy: StrategyName = "fedavg"
    # FedProx: weight mu of the proximal term mu/2 ||w - w_global||^2 on the site's LoRA params.
    proximal_mu: float = Field(0.01, ge=0)
    # Server step size: FedAdam / FedYogi (Reddi et al., 2021; None = 1e-2) and FedAvgM
    # (None = 1).
    server_lr: float | None = Field(None, gt=0)
    # FedAvgM (Hsu et al., 2019): momentum of the server's buffer of mean deltas.
    server_momentum: float = Field(0.9, ge=0, lt=1)
    # FedAdam / FedYogi: moments and adaptivity.
    server_beta1: float = Field(0.9, ge=0, lt=1)
    server_beta2: float = Field(0.99, ge=0, lt=1)
    server_tau: float = Field(1e-3, gt=0)
    fraction_fit: float = Field(1.0, gt=0, le=1)
    min_fit_sites: int = Field(1, gt=0)
    # The server evaluates the global adapter on its held-out split after every k-th round,
    # and always before training and after the last round. A larger k saves that time in runs
    # of many short rounds (metrics.jsonl then has no "eval" for the rounds in between).
    evaluate_every: int = Field(1, gt=0)
    # Flower SecAgg+: the server sees only the sum of the sites' deltas. None (default) means
    # off in `fedtune simulate` and on in a deployment (`fedtune server`).
    secagg: bool | None = None
    # SecAgg+ fixed-point encoding (server/secagg.py): per-coordinate bound on a site's weighted
    # delta (larger values are clipped by SecAgg+), and an upper bound on any site's record
    # count (the weight normaliser; the aggregate's quantization error grows with it).
    secagg_clip: float = Field(1.0, gt=0)
    secagg_max_records: int = Field(10_000, gt=0)
    # Sites trained in parallel in simulation (Ray actors); 0 = number of CPU cores.
    parallel_sites: int = Field(0, ge=0)
    # Simulation only: the simulated sites send their training loss (an opt-in value,
    # common/disclosure.py), for loss curves. A deployed site ignores this: it sends its loss
    # only if its own site.toml says `[disclosure] train_loss = true`.
    report_train_loss: bool = True
    # Wire encoding of each site's delta (common/codec.py): "fp32" as is, "fp16" (1/2 the
    # bytes) or "int8" with one scale per tensor (1/4). Not with SecAgg+ (its own encoding).
    update_encoding: Literal["fp32", "fp16", "int8"] = "fp32"
    # Reliability (docs/reliability.md). How long the server waits for the sites' replies to
    # one exchange (a round; each of SecAgg+'s four stages); late or dead sites are left out
    # and the round goes on with the others if at least min_fit_sites replied. None: no limit
    # (a killed site is still noticed when Flower's heartbeat lapses, about a minute).
    round_timeout_s: float | None = Field(None, gt=0)
    # Server-side validation: a site update whose L2 norm (all tensors) is above this bound is
    # rejected (with SecAgg+, the aggregate is checked instead). None: no norm bound.
    max_update_norm: float | None = Field(None, gt=0)

    @field_validator("strategy", mode="before")
    @classmethod
    def _known_strategy(cls, v: object) -> object:
        if v not in STRATEGY_NAMES:
            raise ValueError(
                f"unknown strategy {v!r}; choose one of: {', '.join(STRATEGY_NAMES)}"
            )
        return v

    @property
    def freeze_lora_a(self) -> bool:
        """True when the strategy trains and sends only LoRA's B matrices."""
        return STRATEGY_TRAITS[self.strategy].frozen_a

    @model_validator(mode="after")
    def _min_le_sites(self) -> FederationConfig:
        if self.min_fit_sites > self.num_sites:
            raise ValueError(
                f"min_fit_sites ({self.min_fit_sites}) > num_sites ({self.num_sites}): "
                "lower federation.min_fit_sites or raise federation.num_sites"
            )
        if self.update_encoding != "fp32" and self.secagg:
            raise ValueError(
                f"federation.update_encoding = {self.update_encoding!r} cannot be combined with "
                "SecAgg+: SecAgg+ sends its own fixed-point integers (federation.secagg_clip, "
                "server/secagg.py), so a lossy fp16/int8 encoding would only add error. Set "
                "federation.update_encoding = 'fp32' or federation.secagg = false"
            )
        if self.secagg:
            _check_secagg_sites(self)
        if STRATEGY_TRAITS[self.strategy].needs_plain_updates and self.secagg:
            others = [n for n, t in STRATEGY_TRAITS.items() if not t.needs_plain_updates]
            raise ValueError(
                f"strategy {self.strategy!r} multiplies each site's B and A, so it needs the "
                "individual updates; SecAgg+ reveals only their sum. Turn federation.secagg "
                f"off or choose {' / '.join(others)}"
            )
        return self


def secagg_threshold(num_sites: int) -> int:
    """SecAgg+ reconstruction threshold used by the server (server/server_app.py): how many
    sites of a round must survive to the end for the sum to be unmasked. Dropouts tolerated:
    sites - it."""
    return max(2, (2 * num_sites) // 3)


def _check_secagg_sites(fed: FederationConfig) -> None:
    """SecAgg+ settings that cannot work, refused with how to fix them."""
    n = fed.num_sites
    if n < 3:
        raise ValueError(
            f"SecAgg+ needs at least 3 sites (federation.num_sites = {n}): with 2, each site "
            "could recover the other's update from the sum. Raise federation.num_sites or set "
            "federation.secagg = false"
        )
    sampled = max(int(n * fed.fraction_fit), fed.min_fit_sites)
    threshold = secagg_threshold(n)
    need = max(3, threshold)
    if sampled < need:
        raise ValueError(
            f"SecAgg+ with {n} sites unmasks a round only if {threshold} sampled sites survive "
            f"it (and needs 3 or more), but federation.fraction_fit = {fed.fraction_fit:g} "
            f"samples only {sampled} site(s) per round. Raise federation.fraction_fit to at "
            f"least {need / n:.2g}, or set federation.secagg = false"
        )


# Strategies whose aggregate is the mean of the site updates: what site-level DP noise assumes.
CENTRAL_DP_STRATEGIES = frozenset(n for n, t in STRATEGY_TRAITS.items() if t.mean_aggregate)


class CentralDPConfig(_Section):
    """Optional site-level DP (DP-FedAvg): Flower's DifferentialPrivacy*Clipping wrappers.

    Each site's update is clipped to L2 norm `clipping_norm`, the server averages them with
    equal weight and adds Gaussian noise of std noise_multiplier * clipping_norm / sites.
    """

    enabled: bool = False
    # "server": the server clips each update (it sees individual updates: no SecAgg+).
    # "client": each site clips its own update (works with SecAgg+).
    side: Literal["server", "client"] = "server"
    # "adaptive": the clipping norm follows a quantile of the update norms (Andrew et al. 2021).
    clipping: Literal["fixed", "adaptive"] = "fixed"
    noise_multiplier: float = Field(1.0, gt=0)
    # Fixed clipping norm, or the initial norm with adaptive clipping.
    clipping_norm: float = Field(0.1, gt=0)
    target_clipped_quantile: float = Field(0.5, ge=0, le=1)
    clip_norm_lr: float = Field(0.2, gt=0)
    # Noise std of the clipped-count with adaptive clipping; None: Flower's default (sites / 20).
    clipped_count_stddev: float | None = Field(None, ge=0)
    # Site-level delta; None: 1 / (10 x num_sites). Must be below 1 / num_sites.
    delta: float | None = Field(None, gt=0, lt=1)


class DataConfig(_Section):
    """Where the data comes from and how it is split into sites."""

    # "demo" (made by fedtune), or a .jsonl / .csv file.
    train: str = "demo"
    # The server's held-out evaluation set (common/splits.py). A file (.jsonl / .csv, same
    # columns as `train`): used whole unless max_eval_records caps it. None: eval_fraction of
    # `train` is held out before the sites' split (seeded by data.seed; never trained on), and
    # at most AUTO_EVAL_CAP (500) of those records are evaluated, to keep each round's
    # evaluation short; set max_eval_records to evaluate more (or fewer).
    eval: str | None = None
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    # Cap on evaluated records, drawn uniformly (seeded). None: see `eval` above.
    max_eval_records: int | None = Field(None, gt=0)
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
    # The unit of privacy at each site (docs/privacy.md, "Privacy unit: records or persons").
    # "record" (default): DP per record. A column name (e.g. "patient_id", present in every
    # record): DP per person, all records with the same value being one person: Poisson
    # sampling over persons, one clipped gradient per person (the mean of their records'
    # gradients), δ < 1/persons; train.batch_size is then the expected persons per batch.
    privacy_unit: str = "record"
    # Person-level only: at most this many records of a sampled person enter a step, drawn
    # uniformly at random, afresh at every step, with the site's secret generator. None: all.
    max_records_per_person: int | None = Field(None, gt=0)
    # Record-level runs: the column that names the person behind each record (e.g.
    # "patient_id"), if the data has one. Not used for training: the site counts the records of
    # its largest person (k), and the report states the group-privacy bound (kε, k·e^((k-1)ε)·δ)
    # that a record-level guarantee gives that person. With a person-level privacy_unit it
    # defaults to (and must equal) that column.
    person_column: str | None = None

    @field_validator("privacy_unit")
    @classmethod
    def _unit_name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError('must be "record" or the name of a column (e.g. "patient_id")')
        return v

    @property
    def person_level(self) -> bool:
        """True when the unit of privacy is a person (a column), not a record."""
        return self.privacy_unit != "record"

    @property
    def person_key(self) -> str | None:
        """The column naming each record's person: the privacy unit, else the reporting hint."""
        return self.privacy_unit if self.person_level else self.person_column

    @model_validator(mode="after")
    def _unit_settings(self) -> DataConfig:
        if self.person_level and self.person_column not in (None, self.privacy_unit):
            raise ValueError(
                f"data.person_column = {self.person_column!r} differs from data.privacy_unit = "
                f"{self.privacy_unit!r}: with a person-level privacy unit, leave "
                "data.person_column unset (it is the privacy unit's column)")
        if self.max_records_per_person is not None and not self.person_level:
            raise ValueError("data.max_records_per_person bounds a person's records in a "
                             "person-level run: set data.privacy_unit to the person column, or "
                             "unset data.max_records_per_person")
        return self


class OutputConfig(_Section):
    dir: Path = Path("runs")
    run_name: str | None = None


class TrackingConfig(_Section):
    """Experiment tracking: the server's per-round metrics also go to TensorBoard and/or MLflow
    (server/tracking.py; the optional extra `pip install 'fedtune[tracking]'`). Off by default;
    metrics.jsonl is written either way and stays the run's record."""

    # true: TensorBoard event files under <run dir>/tensorboard/ (`tensorboard --logdir` it).
    tensorboard: bool = False
    # true: an MLflow run in a SQLite store inside the run directory (<run dir>/mlflow.db;
    # `mlflow ui --backend-store-uri sqlite:///<run dir>/mlflow.db`).
    mlflow: bool = False
    # An MLflow tracking URI instead of that store (http://mlflow:5000, sqlite:///x.db);
    # setting it turns MLflow on by itself.
    mlflow_uri: str | None = None
    mlflow_experiment: str = Field("fedtune", min_length=1)

    @property
    def mlflow_enabled(self) -> bool:
        """MLflow is on: `mlflow = true` or a `mlflow_uri`."""
        return self.mlflow or self.mlflow_uri is not None


class RunConfig(_Section):
    """Everything a federated run needs."""

    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    lora: LoraSettings = LoraSettings()
    dp: DPConfig = DPConfig()
    central_dp: CentralDPConfig = CentralDPConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()
    data: DataConfig = DataConfig()
    output: OutputConfig = OutputConfig()
    tracking: TrackingConfig = TrackingConfig()
    seed: int = 0

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        self._resolve_auto_lr()
        if self.data.partition == "column" and not self.data.partition_column:
            raise ValueError("data.partition = 'column' needs data.partition_column")
        cdp, sites = self.central_dp, self.federation.num_sites
        if cdp.enabled and cdp.side == "server" and self.federation.secagg:
            raise ValueError(
                "central_dp.side = 'server' clips each site's update at the server, but with "
                "SecAgg+ the server sees only their sum: set central_dp.side = 'client'"
            )
        if cdp.enabled and self.federation.strategy not in CENTRAL_DP_STRATEGIES:
            raise ValueError(
                f"central_dp calibrates its noise to the mean of the site updates; strategy "
                f"{self.federation.strategy!r} does not output that mean. Use one of: "
                f"{', '.join(sorted(CENTRAL_DP_STRATEGIES))}"
            )
        sampled = max(int(sites * self.federation.fraction_fit), self.federation.min_fit_sites)
        count_std = (cdp.clipped_count_stddev if cdp.clipped_count_stddev is not None
                     else sampled / 20)
        if cdp.enabled and cdp.clipping == "adaptive" and cdp.noise_multiplier >= 2 * count_std:
            raise ValueError(
                f"adaptive clipping splits central_dp.noise_multiplier = {cdp.noise_multiplier:g} "
                f"between the update and the clipped count, whose noise std is "
                f"{count_std:g} (central_dp.clipped_count_stddev, default sites/20); it must be "
                f"> noise_multiplier / 2: raise central_dp.clipped_count_stddev"
            )
        if cdp.enabled and cdp.delta is not None and cdp.delta >= 1.0 / sites:
            raise ValueError(
                f"central_dp.delta = {cdp.delta:g} is not below 1/num_sites = {1 / sites:.3g}"
            )
        return self

    def _resolve_auto_lr(self) -> None:
        """Replace `train.lr = "auto"` by its value for this run's length (and strategy)."""
        t = self.train
        if t.lr != "auto":
            if t.lr_rule == "auto" and not _rule_value(self, t.lr):
                t.lr_rule = "fixed"  # a saved "auto" value, then rounds or steps changed
            return
        if t.optimizer != "adamw":
            raise ValueError('train.lr = "auto" is a rule for AdamW (common/step_size.py); '
                             'with train.optimizer = "sgd" set train.lr to a number')
        t.lr = _auto_lr(self)
        t.lr_rule = "auto"


def auto_lr_inputs(cfg: RunConfig) -> dict[str, Any]:
    """What the "auto" step-size rule (common/step_size.py) reads from a run's config."""
    fed = cfg.federation
    return {"rounds": fed.rounds, "local_steps": cfg.train.local_steps, "dp": cfg.dp.enabled,
            "server_momentum": fed.server_momentum if fed.strategy == "fedavgm" else None}


def _auto_lr(cfg: RunConfig) -> float:
    from fedtune.common.step_size import auto_lr

    return auto_lr(**auto_lr_inputs(cfg))


def _rule_value(cfg: RunConfig, lr: float) -> bool:
    """Whether `lr` is what `train.lr = "auto"` gives for this run (a reloaded config.toml)."""
    return abs(lr - _auto_lr(cfg)) <= 1e-9 * max(lr, 1e-12)


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
    top = cfg.model_dump(mode="json")
    for key, value in top.items():
        if not isinstance(value, dict) and value is not None:
            out.append(f"{key} = {_toml_value(value)}")
    for key, value in top.items():
        if isinstance(value, dict):
            out.append(f"\n[{key}]")
            for k, v in value.items():
                # TOML has no null: an unset key is a comment, with what "unset" means if known
                out.append(f"{k} = {_toml_value(v)}" if v is not None else
                           f"# {k}: not set{UNSET_MEANING.get(f'{key}.{k}', '')}")
    return "\n".join(out).lstrip() + "\n"


# What an unset key means, where that is not obvious (shown by `fedtune config show`).
UNSET_MEANING = {
    "federation.secagg": " (SecAgg+ off in `fedtune simulate`, on in `fedtune server`)",
    "data.eval": (" (a held-out file, same columns as data.train, evaluated whole; unset: "
                  "data.eval_fraction of data.train is held out, seeded by data.seed)"),
    "data.max_eval_records": (" (all of data.eval; at most 500 of the split held out from "
                              "data.train)"),
    "data.max_records_per_person": " (all records of each sampled person)",
    "data.person_column": (" (no person column known: a record-level report states no "
                           "group-privacy bound)"),
    "tracking.mlflow_uri": " (with tracking.mlflow = true: sqlite:///<run dir>/mlflow.db)",
}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'
