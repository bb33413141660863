"""The site's Flower ClientApp in a deployment: `client.supernode_app:app`.

`fedtune server` submits a small Flower app whose `clientapp` component is this module (see
server/coordinator.py). Each site's SuperNode runs it with the site's own configuration file,
passed by the site daemon as the SuperNode's node config (`site-config="/path/site.toml"`):

- the *run* settings (model, LoRA, local steps, rounds) come from the coordinator, as JSON in
  the run config (`fedtune-config`);
- the *site* settings (identity, private data path, state directory, privacy budget, threads)
  come from site.toml and override the run's: the coordinator cannot point a site at other data
  or raise its privacy budget.

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
from flwr.app import Context, Message
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


def run_config_for_site(context: Context, site: SiteConfig) -> RunConfig:
    """The coordinator's run settings with this site's own settings applied on top."""
    raw = context.run_config.get(RUN_CONFIG_KEY)
    if not isinstance(raw, str):
        raise RuntimeError(f"the run carries no '{RUN_CONFIG_KEY}': not a fedtune run")
    cfg = RunConfig.model_validate_json(raw)
    return cfg.model_copy(update={
        "dp": site.run_dp(cfg.dp),
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


def _handle(msg: Message, context: Context) -> Message:
    site = site_config_of(context)
    cfg = run_config_for_site(context, site)
    secagg = bool(cfg.federation.secagg)
    if secagg and _secagg_stage(msg) not in (None, Stage.COLLECT_MASKED_VECTORS):
        return secaggplus_mod(msg, context, _no_training)

    from fedtune.client.client_app import SiteSpec, build_client_app  # torch, transformers, Opacus

    spec = SiteSpec(site.site_id, site.data, site.state_dir)
    run_name = str(context.run_config.get(RUN_NAME_KEY, context.run_id))
    built = build_client_app(cfg, lambda _ctx: spec, secagg=secagg,
                             extra_mods=[local_update_mod(site, run_name, cfg)])
    return built(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context)
