"""The site's policy (site.toml [privacy]) is a floor the coordinator's run cannot weaken.

Each refusal goes through the real deployed ClientApp (`client.supernode_app:app`) with real
Flower messages: the site's data file is malformed, so a run that read it would fail with a data
error; the reply instead carries the policy refusal, the ledger records it, and the coordinator's
strategy, metrics.jsonl and console line name the site.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common import FitIns, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity

from fedtune.client import supernode_app
from fedtune.client.preflight import policy_summary
from fedtune.client.site_config import SitePrivacy, load_site_config
from fedtune.client.site_policy import (
    SIMULATION_POLICY,
    ModelDigests,
    effective_dp,
    site_run_config,
    violations,
)
from fedtune.common.config import DPConfig, RunConfig
from fedtune.common.data import DataError, read_records
from fedtune.common.ledger import PrivacyLedger
from fedtune.common.protocol import NODE_CONFIG_KEY, RUN_CONFIG_KEY, RUN_NAME_KEY

RUN = "run-policy"


def _site(tmp_path: Path, privacy: str, name: str = "hospital-a") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "train.jsonl").write_text('{"input": "a", "output": \n')  # malformed: never parsed
    (d / "site.toml").write_text(
        f'site_id = "{name}"\ndata = "train.jsonl"\nstate_dir = "state"\n'
        f'[coordinator]\naddress = "127.0.0.1:9092"\n[privacy]\n{privacy}\n'
    )
    return d


def _context(site: Path, cfg: RunConfig) -> Context:
    return Context(run_id=1, node_id=7, node_config={NODE_CONFIG_KEY: str(site / "site.toml")},
                   state=RecordDict(),
                   run_config={RUN_CONFIG_KEY: cfg.model_dump_json(), RUN_NAME_KEY: RUN})


def _fit_message(server_round: int = 1) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    ins = FitIns(ndarrays_to_parameters([np.ones(3, np.float32), np.ones((2, 2), np.float32)]),
                 {"run_id": RUN, "server_round": server_round, "num_rounds": 2,
                  "local_steps": 1})
    return Message(content=compat.fitins_to_recorddict(ins, keep_input=True), dst_node_id=7,
                   message_type=MessageType.TRAIN, group_id=str(server_round))


def _setup_message(sample: int, shares: int, threshold: int) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    configs = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: sample, Key.SHARE_NUMBER: shares,
               Key.THRESHOLD: threshold, Key.CLIPPING_RANGE: 1.0, Key.TARGET_RANGE: 2**22,
               Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 10_000.0}
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)})
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN, group_id="1")


def _run(**sections: dict) -> RunConfig:
    return RunConfig.model_validate({"federation": {"secagg": False}, **sections})


def _local_model(tmp_path: Path) -> Path:
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "model-00001.safetensors").write_bytes(b"weights one")
    (model / "model-00002.safetensors").write_bytes(b"weights two")
    (model / "config.json").write_text("{}")  # not a weight file
    return model


# ---- the merge: the run may only tighten the site's settings --------------------------------


def test_merge_takes_the_stricter_of_run_and_site():
    site = SitePrivacy(target_epsilon=2.5, delta=1e-6, noise_multiplier=1.1, max_epsilon=10,
                       max_grad_norm=0.5, accountant="prv")
    dp = effective_dp(DPConfig(target_epsilon=8, delta=1e-5, noise_multiplier=0.9,
                               max_epsilon=50), site)
    assert (dp.target_epsilon, dp.delta, dp.noise_multiplier, dp.max_epsilon) == (2.5, 1e-6,
                                                                                   1.1, 10)
    assert (dp.max_grad_norm, dp.accountant, dp.enabled) == (0.5, "prv", True)
    tighter = effective_dp(DPConfig(target_epsilon=1, delta=1e-8, noise_multiplier=2.0), site)
    assert (tighter.target_epsilon, tighter.delta, tighter.noise_multiplier) == (1, 1e-8, 2.0)
    # A run with DP off: on at a site daemon (whose policy refuses it anyway), off in simulation
    off = DPConfig(enabled=False)
    assert effective_dp(off, SitePrivacy(target_epsilon=3)).enabled
    for dp_run in (off, DPConfig(target_epsilon=8, delta=1e-5)):
        cfg = RunConfig(dp=dp_run)
        assert site_run_config(cfg, SIMULATION_POLICY).dp == cfg.dp
        assert violations(SIMULATION_POLICY, cfg) == []


def test_violations_name_the_key():
    policy = SitePrivacy(max_epsilon=6, max_delta=1e-6, require_secagg=True, max_rounds=3,
                         allowed_models=[{"name": "all-minilm-l6-v2", "sha256": "a" * 64}])
    cfg = RunConfig.model_validate({"dp": {"target_epsilon": 8, "delta": 1e-5},
                                    "federation": {"secagg": False, "rounds": 5}})
    found = violations(policy, cfg)
    assert found == [
        "site policy: privacy.max_epsilon = 6, the run asks dp.target_epsilon = 8",
        "site policy: privacy.max_delta = 1e-06, the run asks dp.delta = 1e-05",
        "site policy: privacy.require_secagg = true, the run asks federation.secagg = false",
        "site policy: privacy.max_rounds = 3, the run asks federation.rounds = 5",
        "site policy: privacy.allowed_models = ['all-minilm-l6-v2'], the run asks "
        "model.name = 'smollm2-135m-instruct'",
    ]
    ok = RunConfig.model_validate({"dp": {"target_epsilon": 5, "delta": 1e-7},
                                   "federation": {"secagg": True, "num_sites": 3, "rounds": 3},
                                   "model": {"name": "all-minilm-l6-v2"}})
    assert violations(policy, ok, model_digest=lambda _name: "a" * 64) == []
    assert "round 4" in violations(policy, ok, server_round=4,
                                   model_digest=lambda _name: "a" * 64)[0]
    # The site's own per-run cap tightens a run that asks more: not a refusal.
    capped = policy.model_copy(update={"target_epsilon": 4.0})
    asks_8 = ok.model_copy(update={"dp": DPConfig(target_epsilon=8, delta=1e-7)})
    assert violations(capped, asks_8, model_digest=lambda _name: "a" * 64) == []
    assert effective_dp(asks_8.dp, capped).target_epsilon == 4.0
    # Earlier runs used up the lifetime budget (the site's ledger): refused before any data.
    assert violations(policy, ok, model_digest=lambda _name: "a" * 64,
                      prior_epsilon=lambda _d, _a: 6.2) == [
        "site policy: privacy.max_epsilon = 6 is used up: earlier runs spent epsilon = 6.2 "
        "(delta = 1e-07)"]


# ---- refused at the deployed site, before its data is read ---------------------------------

CASES = {
    "dp off": ("", {"dp": {"enabled": False}},
               "privacy.allow_no_dp = false (DP-SGD is required at this site), "
               "the run asks dp.enabled = false"),
    "epsilon": ("max_epsilon = 6.0", {"dp": {"target_epsilon": 8.0}},
                "privacy.max_epsilon = 6, the run asks dp.target_epsilon = 8"),
    "delta": ("max_delta = 1e-6", {"dp": {"delta": 1e-5}},
              "privacy.max_delta = 1e-06, the run asks dp.delta = 1e-05"),
    "model not listed": ('allowed_models = [{ name = "all-minilm-l6-v2", sha256 = "'
                         + "0" * 64 + '" }]', {},
                         "privacy.allowed_models = ['all-minilm-l6-v2'], the run asks "
                         "model.name = 'smollm2-135m-instruct'"),
    "secagg off": ("require_secagg = true", {},
                   "privacy.require_secagg = true, the run asks federation.secagg = false"),
    "rounds": ("max_rounds = 3", {"federation": {"secagg": False, "rounds": 10}},
               "privacy.max_rounds = 3, the run asks federation.rounds = 10"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_run_violating_the_policy_is_refused_before_data(tmp_path: Path, case: str):
    privacy, run, expected = CASES[case]
    site = _site(tmp_path, privacy)
    with pytest.raises(DataError):  # the site's data would fail to parse if it were read
        read_records(site / "train.jsonl")
    ctx = _context(site, _run(**run))
    for rnd in (1, 2):  # refused again next round; the ledger records the refusal once
        reply = supernode_app.app(_fit_message(rnd), ctx)
        res = compat.recorddict_to_fitres(reply.content, keep_input=True)
        assert res.num_examples == 0
        assert res.metrics["site_id"] == "hospital-a" and res.metrics["status"] == "refused"
        reason = str(res.metrics["reason"])
        # The coordinator sees which key refused (numbers redacted); the ledger the full text.
        assert reason.startswith("refused: site policy: privacy.")
        assert expected.split(" =")[0] in reason
    declines = PrivacyLedger(site / "state", "hospital-a").declines(RUN)
    assert [d.reason for d in declines] == [f"refused: site policy: {expected}"]
    assert {p.status for p in PrivacyLedger(site / "state", "hospital-a").payloads(RUN)} == {
        "refused"}


def test_model_weights_must_match_the_allowed_hash(tmp_path: Path):
    model = _local_model(tmp_path)
    right = ModelDigests(tmp_path / "probe")(str(model))
    assert right is not None
    site = _site(tmp_path, f'allowed_models = [{{ name = "{model}", sha256 = "{"f" * 64}" }}]')
    ctx = _context(site, _run(model={"name": str(model)}))
    res = compat.recorddict_to_fitres(supernode_app.app(_fit_message(), ctx).content, True)
    assert res.num_examples == 0 and res.metrics["status"] == "refused"
    ledger = PrivacyLedger(site / "state", "hospital-a").declines(RUN)
    assert f"its weights at this site hash to {right}" in ledger[0].reason
    allowed = SitePrivacy.model_validate({"allowed_models": [{"name": str(model),
                                                              "sha256": right}]})
    assert violations(allowed, _run(model={"name": str(model)}),
                      model_digest=ModelDigests(site / "state")) == []


def test_model_digest_is_the_sha256sum_listing_and_is_cached(tmp_path: Path):
    model = _local_model(tmp_path)
    digests = ModelDigests(tmp_path / "state")
    listing = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                      for p in sorted(model.glob("*.safetensors")))
    assert digests(str(model)) == hashlib.sha256(listing.encode()).hexdigest()
    one = model / "model-00001.safetensors"
    st = one.stat()
    one.write_bytes(b"weights ONE")  # same size; mtime put back: the cached hash is used
    os.utime(one, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert digests(str(model)) == hashlib.sha256(listing.encode()).hexdigest()
    os.utime(one, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new version: hashed again
    assert digests(str(model)) != hashlib.sha256(listing.encode()).hexdigest()
    cached = json.loads((tmp_path / "state" / "model_hashes.json").read_text())
    assert str(one.resolve()) in cached
    assert digests("no-such-org/no-such-model") is None  # a hub id cannot be checked here


# ---- SecAgg+ parameters below the site's floor ------------------------------------------------


@pytest.mark.parametrize(("sample", "shares", "threshold", "what"), [
    (4, 4, 2, "reconstruction threshold of # of # shares"),
    (6, 3, 3, "share count of # for # sampled sites"),
])
def test_secagg_setup_below_the_floor_is_refused(tmp_path: Path, sample: int, shares: int,
                                                  threshold: int, what: str):
    from fedtune.server.strategy.delta import refusals

    site = _site(tmp_path, "min_secagg_threshold_fraction = 0.6")
    ctx = _context(site, _run(federation={"secagg": True, "num_sites": 4}))
    with pytest.raises(RuntimeError) as err:
        supernode_app.app(_setup_message(sample, shares, threshold), ctx)
    declines = PrivacyLedger(site / "state", "hospital-a").declines(RUN)
    assert len(declines) == 1
    assert "privacy.min_secagg_threshold_fraction = 0.6" in declines[0].reason
    # What Flower's SuperNode replies to the coordinator, and what the coordinator makes of it
    error = Error(2, str(type(err.value)) + ":<'" + str(err.value) + "'>")
    (found,) = refusals([Exception(error)])
    assert found["site_id"] == "hospital-a" and found["status"] == "refused"
    assert "privacy.min_secagg_threshold_fraction = #" in found["reason"]
    assert what in found["reason"]


def test_secagg_setup_at_the_floor_goes_on(tmp_path: Path):
    site = _site(tmp_path, "min_secagg_threshold_fraction = 0.6")
    ctx = _context(site, _run(federation={"secagg": True, "num_sites": 4}))
    reply = supernode_app.app(_setup_message(4, 4, 3), ctx)
    assert Key.PUBLIC_KEY_1 in reply.content.config_records[RECORD_KEY_CONFIGS]
    assert not PrivacyLedger(site / "state", "hospital-a").declines(RUN)


# ---- the coordinator shows refusals by site name --------------------------------------------


def test_coordinator_lists_refused_sites_by_name(tmp_path: Path):
    from fedtune.server.coordinator_run import describe_round
    from fedtune.server.recorder import RunRecorder
    from fedtune.server.strategy import STRATEGIES

    site = _site(tmp_path, "max_delta = 1e-6")
    reply = supernode_app.app(_fit_message(), _context(site, _run()))
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    other = _site(tmp_path, "min_secagg_threshold_fraction = 0.9", name="hospital-b")
    with pytest.raises(RuntimeError) as err:
        supernode_app.app(_setup_message(4, 4, 3),
                          _context(other, _run(federation={"secagg": True, "num_sites": 4})))
    failure = Exception(Error(2, f"<class 'RuntimeError'>:<'{err.value}'>"))

    (tmp_path / "run").mkdir()
    recorder = RunRecorder(tmp_path / "run", RUN, None, None, num_rounds=3,  # type: ignore[arg-type]
                           evaluate_every=2)
    strategy = STRATEGIES["fedavg"](fraction_fit=1.0, accept_failures=True)
    strategy.on_site_replies = recorder.record_sites
    params, _ = strategy.aggregate_fit(
        1, [(None, FitRes(Status(0, ""), fitres.parameters, 0, fitres.metrics))], [failure])
    assert params is None  # no site trained
    recorder.evaluate(1, [np.zeros(3, np.float32)], {})  # round 1 is not evaluated: no model
    (record,) = [json.loads(line) for line in recorder.metrics_path.read_text().splitlines()]
    by_site = {s["site_id"]: s for s in record["sites"]}
    assert by_site["hospital-a"]["status"] == by_site["hospital-b"]["status"] == "refused"
    assert "privacy.max_delta" in by_site["hospital-a"]["reason"]
    assert "privacy.min_secagg_threshold_fraction" in by_site["hospital-b"]["reason"]
    line = describe_round(record)
    assert "hospital-a: refused (refused: site policy: privacy.max_delta" in line
    assert "hospital-b: refused (refused: site policy: privacy.min_secagg" in line


def test_check_prints_the_effective_policy(tmp_path: Path):
    model = _local_model(tmp_path)
    digest = ModelDigests(tmp_path / "probe")(str(model))
    site = _site(tmp_path, f"target_epsilon = 3.0\nmax_delta = 1e-6\nrequire_secagg = true\n"
                           f'allowed_models = [{{ name = "{model}", sha256 = "{digest}" }}]')
    lines = "\n".join(policy_summary(load_site_config(site / "site.toml", check_files=False)))
    assert "DP-SGD: required" in lines
    assert "ε of one run: at most 3 (privacy.target_epsilon); a run asking more trains at " \
        "this ε" in lines
    assert "δ: at most 1e-06 (privacy.max_delta)" in lines
    assert "SecAgg+: required" in lines and "rounds: no limit" in lines
    assert f"model allowed: {model} sha256 {digest} (matches)" in lines


def test_site_opts_in_to_sending_its_train_loss(tmp_path: Path):
    from fedtune.common.config import ConfigError
    from fedtune.common.disclosure import disclose

    site = _site(tmp_path, "")
    toml = site / "site.toml"
    metrics = {"site_id": "hospital-a", "status": "ok", "train_loss": 1.5}
    default = load_site_config(toml, check_files=False)
    assert "train_loss" not in disclose(metrics, default.disclosure.keys())
    toml.write_text(toml.read_text() + "[disclosure]\ntrain_loss = true\n")
    opted = load_site_config(toml, check_files=False)
    assert disclose(metrics, opted.disclosure.keys())["train_loss"] == 1.5
    toml.write_text(toml.read_text() + "examples_seen = true\n")
    with pytest.raises(ConfigError, match="disclosure.examples_seen"):
        load_site_config(toml, check_files=False)
