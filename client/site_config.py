"""The site daemon's configuration, `site.toml` (`fedtune client --config site.toml`).

A site's file says who the site is, where its private data and state live, how to reach the
coordinator and with which key, and the site's own privacy budget. The run itself (model, LoRA,
training steps, rounds) comes from the coordinator with the run; the site's `[privacy]` section is
the floor the run cannot weaken: the run's settings may only tighten it, and a run that asks for
more than it allows is refused before any data is read (client/site_policy.py).

Example `site.toml`::

    site_id = "hospital-a"
    data = "/srv/fedtune/data/train.jsonl"
    state_dir = "/var/lib/fedtune"

    [coordinator]
    address = "coordinator.example.org:9092"
    root_certificate = "/etc/fedtune/certs/ca.crt"

    [auth]
    private_key = "/etc/fedtune/certs/site.key"

    [privacy]
    target_epsilon = 4.0      # the most one run may spend here (a run asking more gets 4)
    max_epsilon = 10.0        # the most all runs together may spend here
    max_delta = 1e-6
    require_secagg = true
    min_secagg_threshold_fraction = 0.6
    max_rounds = 50
    allowed_models = [{ name = "smollm2-135m-instruct", sha256 = "..." }]
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedtune.common.config import ConfigError, DPConfig, _format_validation_error

SITE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------
# Site side: site.toml.


class SiteCoordinator(_Section):
    """How the site reaches the coordinator's Fleet API."""

    address: str = Field(..., min_length=3)  # host:port of the SuperLink's Fleet API (9092)
    # CA certificate that signed the coordinator's TLS certificate (`fedtune certs init`).
    root_certificate: Path | None = None

    @field_validator("address")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected HOST:PORT (e.g. coordinator.example.org:9092), got {v!r}")
        return v


class SiteAuth(_Section):
    # The site's SuperNode private key (`fedtune certs site SITE`), EC, OpenSSH format, 0600.
    private_key: Path


class AllowedModel(_Section):
    """A base model this site agrees to train: its name and the SHA-256 of its weights."""

    name: str = Field(..., min_length=1)
    # Of the weight file as resolved at the site (several files: client/site_policy.py).
    sha256: str = Field(..., pattern=r"^[0-9a-fA-F]{64}$")


class SitePrivacy(_Section):
    """The site's privacy policy: a floor the run config can tighten but never weaken.

    The run is tightened to: target_epsilon (the most ε one run may spend), delta,
    noise_multiplier (the least), and the site's own max_grad_norm and accountant.
    Refused: a run whose ε, once tightened, exceeds max_epsilon (all runs together) or what
    earlier runs left of it; a δ above max_delta; DP off (unless allow_no_dp); SecAgg+ off with
    require_secagg, or below min_secagg_threshold_fraction; a model not in allowed_models;
    more than max_rounds rounds. privacy_unit = <column> makes every run person-level here.
    """

    target_epsilon: float | None = Field(None, gt=0)
    delta: float | None = Field(None, gt=0, lt=1)
    noise_multiplier: float | None = Field(None, ge=0)
    max_grad_norm: float | None = Field(None, gt=0)
    accountant: Literal["rdp", "prv"] | None = None
    max_epsilon: float | None = Field(None, gt=0)
    max_delta: float | None = Field(None, gt=0, lt=1)
    # DP-SGD is required unless the site itself opts out here.
    allow_no_dp: bool = False
    require_secagg: bool = False
    # SecAgg+: the smallest reconstruction threshold / share count the site accepts.
    min_secagg_threshold_fraction: float | None = Field(None, gt=0, le=1)
    allowed_models: list[AllowedModel] | None = None
    max_rounds: int | None = Field(None, gt=0)
    # The unit of privacy this site requires: a person column (e.g. "patient_id"): every run
    # trains per person at this site (data.privacy_unit), even one that asks "record"; a run
    # that asks another column is refused. None or "record": as the run says.
    privacy_unit: str | None = None


class SiteDaemon(_Section):
    """Supervision of the SuperNode process."""

    # Local port of the SuperNode's Runtime API (ClientApp <-> SuperNode); unique per machine.
    runtime_port: int = Field(9094, gt=0, lt=65536)
    # How long one SuperNode keeps retrying a lost (or not yet established) link itself before
    # the daemon replaces it; then the daemon's backoff applies.
    link_timeout_s: float = Field(30.0, gt=0)
    # Reconnect backoff after the link to the coordinator drops: doubles up to the maximum.
    initial_backoff_s: float = Field(1.0, gt=0)
    max_backoff_s: float = Field(60.0, gt=0)
    # How long SIGTERM waits for the SuperNode (and a running ClientApp) before killing it.
    stop_timeout_s: float = Field(30.0, gt=0)


class SiteDisclosure(_Section):
    """Opt-in values this site agrees to send besides the required ones (common/disclosure.py)."""

    # The mean training loss of each round: not covered by the DP guarantee.
    train_loss: bool = False

    def keys(self) -> frozenset[str]:
        return frozenset(k for k, on in self.model_dump().items() if on)


class SiteAudit(_Section):
    """This site as an auditor (docs/privacy.md, "Empirical audit"): in every run, m gradient
    canaries, each in with probability 1/2 (the site's secret), are clipped into its DP sum
    like records; `fedtune audit --site site.toml --run RUN` then states the lower bound."""

    white_box_canaries: int | None = Field(None, ge=2)


class SiteConfig(_Section):
    site_id: str = Field(..., pattern=SITE_ID_PATTERN)
    # The site's private training data (.jsonl or .csv). Never leaves the site.
    data: Path
    # Privacy ledger, Flower's home for this SuperNode, local copies of sent updates.
    state_dir: Path
    coordinator: SiteCoordinator
    auth: SiteAuth | None = None
    privacy: SitePrivacy = SitePrivacy()
    daemon: SiteDaemon = SiteDaemon()
    disclosure: SiteDisclosure = SiteDisclosure()
    audit: SiteAudit = SiteAudit()
    # Torch threads for local training; 0: all cores of this machine.
    threads: int = Field(0, ge=0)
    # Keep a local copy of every update this site sends (state_dir/sent/, for audit).
    keep_update_copies: bool = False

    def run_dp(self, dp: DPConfig) -> DPConfig:
        """The run's DP settings tightened by this site's policy (client/site_policy.py)."""
        from fedtune.client.site_policy import effective_dp

        return effective_dp(dp, self.privacy)


def _resolve(base: Path, p: Path | None) -> Path | None:
    if p is None:
        return None
    p = Path(os.path.expandvars(str(p))).expanduser()
    return p if p.is_absolute() else (base / p)


def load_site_config(path: str | Path, *, insecure: bool = False,
                     check_files: bool = True) -> SiteConfig:
    """Read and validate site.toml. Relative paths are relative to the file's directory.

    With `check_files`, the files the daemon needs are checked too, each error naming its key.
    """
    path = Path(path)
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"site config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        cfg = SiteConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, str(path))) from None
    base = path.resolve().parent
    cfg = cfg.model_copy(update={
        "data": _resolve(base, cfg.data),
        "state_dir": _resolve(base, cfg.state_dir),
        "coordinator": cfg.coordinator.model_copy(
            update={"root_certificate": _resolve(base, cfg.coordinator.root_certificate)}),
        "auth": cfg.auth.model_copy(update={"private_key": _resolve(base, cfg.auth.private_key)})
        if cfg.auth else None,
    })
    if check_files:
        problems = check_site_files(cfg, insecure=insecure)
        if problems:
            raise ConfigError(
                f"invalid site configuration in {path}:\n" + "\n".join(f"  {p}" for p in problems)
            )
    return cfg


def check_site_files(cfg: SiteConfig, *, insecure: bool) -> list[str]:
    """Everything the daemon will need, checked before it starts: `key: problem` lines."""
    problems = []
    if not cfg.data.is_file():
        problems.append(f"data: file not found: {cfg.data}")
    elif not os.access(cfg.data, os.R_OK):
        problems.append(f"data: not readable: {cfg.data}")
    elif cfg.data.suffix.lower() not in (".jsonl", ".json", ".ndjson", ".csv"):
        problems.append(f"data: unsupported format {cfg.data.suffix!r} (use .jsonl or .csv)")
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(cfg.state_dir, os.W_OK):
            problems.append(f"state_dir: not writable: {cfg.state_dir}")
    except OSError as e:
        problems.append(f"state_dir: cannot create {cfg.state_dir}: {e.strerror}")
    if insecure:
        return problems
    root = cfg.coordinator.root_certificate
    if root is None:
        problems.append("coordinator.root_certificate: missing (the CA certificate, ca.crt); "
                        "plaintext needs the explicit --insecure flag")
    elif not root.is_file():
        problems.append(f"coordinator.root_certificate: file not found: {root}")
    if cfg.auth is None:
        problems.append("auth.private_key: missing (the site's SuperNode key from "
                        "`fedtune certs site SITE`)")
    else:
        key = cfg.auth.private_key
        if not key.is_file():
            problems.append(f"auth.private_key: file not found: {key}")
        else:
            mode = stat.S_IMODE(key.stat().st_mode)
            if mode & 0o077:
                problems.append(
                    f"auth.private_key: {key} is accessible by other users (mode {mode:o}); "
                    f"run `chmod 600 {key}`"
                )
            elif problem := _check_ssh_private_key(key):
                problems.append(f"auth.private_key: {problem}")
    return problems


def _check_ssh_private_key(path: Path) -> str | None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as e:
        return f"{path} is not an unencrypted OpenSSH private key ({e})"
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return f"{path} is not an EC key (Flower needs NIST P-256/P-384/P-521)"
    return None
