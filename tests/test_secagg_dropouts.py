"""A site lost in the middle of a SecAgg+ round, stage by stage (fast; the end-to-end case with
real SuperNodes killed by SIGKILL is tests/test_faults_deploy.py).

Flower's own SecAgg+ code runs both sides: the server's workflow (server/secagg.py's
`DropoutTolerantSecAggPlus`, or Flower's `SecAggPlusWorkflow`) and each site's
`secaggplus_mod`. Only the transport is replaced: the messages of each stage are handed to the
three sites' mods in this process, and a lost site does not answer (as after a timeout) or
answers with an error (as Flower's SuperLink does once the site's heartbeat lapses).
"""

from __future__ import annotations

import copy
import threading
import time

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as FlowerFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.supercore.task_identity import TaskIdentity

from fedtune.common.config import secagg_threshold
from fedtune.server.secagg import DropoutTolerantSecAggPlus, secagg_params

NODES = [101, 202, 303]
LOST = 303
STAGES = list(Stage.all())  # setup, share_keys, collect_masked_vectors, unmask
RECORDS = 36
DELTAS = {n: [np.full(4, 0.01 * (i + 1)), np.full((2, 3), -0.02 * (i + 1))]
          for i, n in enumerate(NODES)}


class _Proxy(ClientProxy):
    def get_properties(self, *a, **k): ...
    def get_parameters(self, *a, **k): ...
    def fit(self, *a, **k): ...
    def evaluate(self, *a, **k): ...
    def reconnect(self, *a, **k): ...


def _proxy(node_id: int) -> _Proxy:
    p = _Proxy(str(node_id))
    p.node_id = node_id
    return p


class _Grid:
    """Delivers each message to the destination site's `secaggplus_mod` (its own Context kept
    between stages, as a SuperNode keeps it); `LOST` stops answering from `lost_from` on."""

    def __init__(self, lost_from: str | None, reply_error: bool) -> None:
        self.lost_from, self.reply_error = lost_from, reply_error
        self.ctx = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                               run_config={}) for n in NODES}

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            received = Message(content=copy.deepcopy(msg.content), dst_node_id=nid,
                               message_type=msg.metadata.message_type,
                               group_id=msg.metadata.group_id)
            if nid == LOST and self.lost_from and STAGES.index(stage) >= STAGES.index(
                    self.lost_from):
                if self.reply_error:
                    replies.append(Message(Error(0, "node unavailable"), reply_to=received))
                continue

            def train(m: Message, _ctx: Context, nid: int = nid) -> Message:
                res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(DELTAS[nid]), RECORDS,
                             {"site_id": str(nid)})
                return Message(compat.fitres_to_recorddict(res, True), reply_to=m)

            try:
                replies.append(secaggplus_mod(received, self.ctx[nid], train))
            except Exception as e:  # the site's ClientApp fails: Flower replies with an error
                replies.append(Message(Error(0, repr(e)), reply_to=received))
        return replies


def _secagg_round(workflow_cls, lost_from: str | None, reply_error: bool = False):
    """One SecAgg+ round of 3 sites, fedtune's parameters; the new global (None: void)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cm = SimpleClientManager()
    for n in NODES:
        cm.register(_proxy(n))
    init = [np.zeros(4), np.zeros((2, 3))]
    strategy = FlowerFedAvg(min_fit_clients=2, min_available_clients=3, accept_failures=True)
    ctx = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                run_config={}),
                        config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=cm)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(init), True)
    n = len(NODES)
    workflow = workflow_cls(num_shares=n, reconstruction_threshold=secagg_threshold(n),
                            **secagg_params(n, max_records=100))
    workflow(_Grid(lost_from, reply_error), ctx)
    new = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
        ctx.state.array_records[MAIN_PARAMS_RECORD], True))
    return new if any(np.any(a) for a in new) else None  # still the zeros: the round was void


def _mean(nodes: list[int]) -> list[np.ndarray]:
    return [np.mean([DELTAS[n][i] for n in nodes], axis=0) for i in range(2)]


@pytest.mark.parametrize("reply_error", [False, True], ids=["silent", "error"])
@pytest.mark.parametrize("lost_from", STAGES)
def test_a_site_lost_in_any_stage_leaves_the_round_to_the_survivors(lost_from, reply_error):
    new = _secagg_round(DropoutTolerantSecAggPlus, lost_from, reply_error)
    assert new is not None, f"round void after a dropout in stage {lost_from!r}"
    # Lost before it sent its masked update: the survivors' mean. Lost while unmasking: its
    # update was already in the masked sum, which the survivors' shares still unmask.
    expected = _mean(NODES if lost_from == Stage.UNMASK else [101, 202])
    step = 2 * secagg_params(3)["clipping_range"] / secagg_params(3)["quantization_range"]
    for got, want in zip(new, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=100 * step)


def test_no_dropout_aggregates_every_site():
    new = _secagg_round(DropoutTolerantSecAggPlus, None)
    for got, want in zip(new, _mean(NODES), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("lost_from", [Stage.SETUP, Stage.SHARE_KEYS])
def test_flower_1_39_voids_the_round_after_an_early_dropout(lost_from):
    """Why server/secagg.py subclasses the workflow. When this fails, Flower has fixed it
    upstream and DropoutTolerantSecAggPlus can go."""
    assert _secagg_round(SecAggPlusWorkflow, lost_from) is None
    assert _secagg_round(SecAggPlusWorkflow, Stage.COLLECT_MASKED_VECTORS) is not None


def test_a_round_waits_for_every_site_before_sizing_its_sample():
    """Flower's FedAvg sizes the sample from the sites connected *before* it waits for
    min_available_clients: a site reconnecting as the round starts was left out (2 of 3)."""
    from fedtune.server.strategy import FedAvg

    strategy = FedAvg(fraction_fit=1.0, min_fit_clients=2, min_available_clients=3,
                      initial_parameters=ndarrays_to_parameters([np.zeros(4)]))
    cm = SimpleClientManager()
    for n in NODES[:2]:
        cm.register(_proxy(n))
    late = threading.Timer(0.5, cm.register, args=(_proxy(NODES[2]),))
    late.start()
    started = time.monotonic()
    sampled = strategy.configure_fit(1, ndarrays_to_parameters([np.zeros(4)]), cm)
    late.join()
    assert sorted(p.node_id for p, _ in sampled) == NODES
    assert time.monotonic() - started >= 0.4
