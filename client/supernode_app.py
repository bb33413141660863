"""The site's Flower ClientApp in a deployment: `client.supernode_app:app`.

`fedtune server` submits a small Flower app whose `clientapp` component is this module (see
server/coordinator.py). Each site's SuperNode runs it with the site's own configuration file,
passed by the site daemon as the SuperNode's node config (`site-config="/path/site.toml"`):

- the *run* settings (model, LoRA, local steps, rounds) come from the coordinator, as JSON in
  the run config (`fedtune-config`);
- the *site* settings (identity, private data path, state directory, privacy policy, threads)
  come from site.toml: the coordinator cannot point a site at other data, and its `[privacy]`
  policy is a floor the run can only tighten. A run (or SecAgg+ setup) that asks for more is
  refused before any data is read, logged and recorded in the ledger (client/site_policy.py).

The training itself is `client.client_app.build_client_app`, the same code path as in simulation.
SecAgg+'s pure-crypto stages (setup, key sharing, unmasking) are answered by Flower's
`secaggplus_mod` without importing torch: Flower starts one ClientApp process per message, and
loading torch/transformers/Opacus takes several seconds of CPU on a small machine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat

from fedtune.client.site_config import SiteConfig, load_site_config
from fedtune.common.atomic import atomic_write
from fedtune.common.config import RunConfig
from fedtune.common.protocol import (
    FITRES_PARAMETERS,
    NODE_CONFIG_KEY,
    RUN_CONFIG_KEY,
    RUN_NAME_KEY,
    site_refusal_message,
)
from fedtune.common.update_checks import check_values

log = logging.getLogger("fedtune.site")
app = ClientApp()


def site_config_of(context: Context) -> SiteConfig:
    path = context.node_config.get(NODE_CONFIG_KEY) or os.environ.get("FEDTUNE_SITE_CONFIG")
    if not path:
        raise RuntimeError(
            f"this SuperNode has no '{NODE_CONFIG_KEY}' in its node config; start it with "
            "`fedtune client --config site.toml`"
        )
    # The daemon validated the files at start-up; here only the values are needed.
    return load_site_config(str(path), check_files=False)


def run_config_of(context: Context) -> RunConfig:
    """The coordinator's run settings, as sent (before the site's policy)."""
    raw = context.run_config.get(RUN_CONFIG_KEY)
    if not isinstance(raw, str):
        raise RuntimeError(f"the run carries no '{RUN_CONFIG_KEY}': not a fedtune run")
    return RunConfig.model_validate_json(raw)


def run_config_for_site(context: Context, site: SiteConfig) -> RunConfig:
    """The coordinator's run settings tightened by this site's policy and own settings."""
    from fedtune.client.site_policy import effective_data

    cfg = run_config_of(context)
    return cfg.model_copy(update={
        # Secret sampling and noise at a deployed site, whatever the run asks: a reproducible
        # seed would let the coordinator recompute every batch and the noise.
        "dp": site.run_dp(cfg.dp).model_copy(update={"reproducible_seed": False}),
        # The privacy unit the site's policy requires (privacy.privacy_unit), if any.
        "data": effective_data(cfg.data, site.privacy),
        "train": cfg.train.model_copy(update={"threads": site.threads}),
        # The site is alone on its machine; the model cache is the site's own.
        "federation": cfg.federation.model_copy(update={"parallel_sites": 1}),
        "model": cfg.model.model_copy(update={"cache_dir": None}),
    })


def _secagg_stage(msg: Message) -> str | None:
    rec = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = rec.get(Key.STAGE) if rec is not None else None
    return stage if isinstance(stage, str) else None


def _no_training(msg: Message, context: Context) -> Message:
    raise RuntimeError(f"SecAgg+ stage {_secagg_stage(msg)!r} does not train")


def _atomic_save(path: Path, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def sent_copy_path(site: SiteConfig, run_name: str, server_round: int) -> Path:
    return site.state_dir / "sent" / run_name / f"round-{server_round:04d}.npz"


def local_update_mod(site: SiteConfig, run_name: str, cfg: RunConfig):
    """A Flower mod inside SecAgg+: sees the plain update before it is masked.

    Warns when SecAgg+'s fixed-point encoding would clip the update, passes the update to
    SecAgg+ in float64, and (with `keep_update_copies`) keeps a local copy of exactly what the
    site contributed.
    """

    def mod(msg: Message, context: Context, call_next) -> Message:
        out = call_next(msg, context)
        if not out.has_content() or not out.content.array_records:
            return out
        fitres = compat.recorddict_to_fitres(out.content, keep_input=True)
        delta = parameters_to_ndarrays(fitres.parameters)
        if fitres.num_examples:
            # Never send a broken update: with SecAgg+ the server could not tell whose it was
            # and would have to discard the whole round (server/validation.py).
            if (problem := check_values(delta, cfg.federation.max_update_norm)) is not None:
                raise RuntimeError(f"site {site.site_id} refuses to send its update: {problem}")
        peak = max((float(np.max(np.abs(d))) for d in delta if d.size), default=0.0)
        state = context.state.config_records.get(RECORD_KEY_STATE)
        if cfg.federation.secagg and state is not None and fitres.num_examples:
            ratio = fitres.num_examples / float(state.get("max_weight", 0) or 1)
            clip = float(state.get("clipping_range", 0) or 0)
            if ratio > 1:
                log.warning("site has %s records > federation.secagg_max_records = %s: SecAgg+ "
                            "will clip its update; raise secagg_max_records at the coordinator",
                            fitres.num_examples, state.get("max_weight"))
            elif clip and peak * ratio > clip:
                log.warning("update peak %.3g exceeds SecAgg+ clipping range %.3g: it will be "
                            "clipped; raise federation.secagg_clip", peak * ratio, clip)
        if cfg.federation.secagg:
            # Flower's SecAgg+ quantizes in the dtype it is given: in float32, `delta + clip`
            # keeps only ~2**-24 * clip of precision, far coarser than the 2**-28 grid chosen in
            # server/secagg.py. Hand it float64 (the masked integers on the wire are the same).
            out.content.array_records[FITRES_PARAMETERS] = compat.parameters_to_arrayrecord(
                ndarrays_to_parameters([np.asarray(d, dtype=np.float64) for d in delta]),
                keep_input=True,
            )
        if site.keep_update_copies:
            rnd = int(compat.recorddict_to_fitins(msg.content, keep_input=True)
                      .config.get("server_round", 0))
            _atomic_save(sent_copy_path(site, run_name, rnd),
                         num_examples=np.asarray(fitres.num_examples),
                         **{f"t{i:03d}": d for i, d in enumerate(delta)})
        return out

    return mod


def _run_name(context: Context) -> str:
    return str(context.run_config.get(RUN_NAME_KEY, context.run_id))


def check_secagg_setup(msg: Message, context: Context, site: SiteConfig) -> None:
    """Refuse (raise) SecAgg+ parameters below the site's floor; logged and in the ledger.

    The error's text names the site and the key (numbers redacted): the coordinator lists it.
    """
    from fedtune.client.site_policy import secagg_violation

    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    problem = secagg_violation(site.privacy, configs)
    if problem is None:
        return
    from fedtune.client.site_policy import record_refusal
    from fedtune.common.disclosure import redact_numbers
    from fedtune.common.ledger import PrivacyLedger

    group = str(msg.metadata.group_id)
    reason = record_refusal(PrivacyLedger(site.state_dir, site.site_id), run_id=_run_name(context),
                            server_round=int(group) if group.isdigit() else 0, reason=problem)
    raise RuntimeError(site_refusal_message(site.site_id, redact_numbers(reason)))


def policy_refusal(msg: Message, context: Context, site: SiteConfig,
                   asked: RunConfig) -> Message | None:
    """The site's refusal reply when the run violates its policy (logged, in the ledger);
    None when the run may go on. Reads no site data."""
    from fedtune.client.site_policy import ModelDigests, violations
    from fedtune.common.ledger import PrivacyLedger

    ledger = PrivacyLedger(site.state_dir, site.site_id)
    config: dict = {}
    if msg.metadata.message_type == MessageType.TRAIN:
        config = dict(compat.recorddict_to_fitins(msg.content, keep_input=True).config)
    run_id = str(config.get("run_id", _run_name(context)))

    def earlier_runs(delta: float, accountant: str) -> float:
        from fedtune.common.privacy import epsilon

        return epsilon([r.mechanism for r in ledger.rows() if r.run_id != run_id], delta,
                       accountant)

    problems = violations(
        site.privacy, asked, num_rounds=int(config.get("num_rounds", 0)) or None,
        server_round=int(config.get("server_round", 0)) or None,
        model_digest=ModelDigests(site.state_dir), prior_epsilon=earlier_runs,
    )
    if not problems:
        return None
    from fedtune.client.site_policy import RefusingClient, record_refusal

    reason = record_refusal(ledger, run_id=run_id, server_round=int(config.get("server_round", 0)),
                            reason="; ".join(problems))
    client = RefusingClient(site.site_id, ledger, run_id, reason)
    mods = [secaggplus_mod] if asked.federation.secagg else []
    return ClientApp(client_fn=lambda _ctx: client.to_client(), mods=mods)(msg, context)


def _handle(msg: Message, context: Context) -> Message:
    site = site_config_of(context)
    asked = run_config_of(context)
    secagg = bool(asked.federation.secagg)
    stage = _secagg_stage(msg) if secagg else None
    if stage == Stage.SETUP:
        check_secagg_setup(msg, context, site)
    if secagg and stage not in (None, Stage.COLLECT_MASKED_VECTORS):
        return secaggplus_mod(msg, context, _no_training)
    # The site's policy, before any data is read: a run that asks for more is refused.
    if (refusal := policy_refusal(msg, context, site, asked)) is not None:
        return refusal
    cfg = run_config_for_site(context, site)

    from fedtune.client.canaries import site_canary_spec
    from fedtune.client.client_app import SiteSpec, build_client_app  # torch, transformers, Opacus

    run_name = str(context.run_config.get(RUN_NAME_KEY, context.run_id))
    m = site.audit.white_box_canaries  # an auditor site: its secret canaries for this run
    spec = SiteSpec(site.site_id, site.data, site.state_dir, disclose=site.disclosure.keys(),
                    canaries=site_canary_spec(site.state_dir, run_name, m) if m else None)
    built = build_client_app(cfg, lambda _ctx: spec, secagg=secagg,
                             extra_mods=[local_update_mod(site, run_name, cfg)])
    return built(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context)
