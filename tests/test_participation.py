"""Who took part in a round, by name (server/participation.py): a site lost in any SecAgg+
stage is named as dropped, with why (fast; Flower's own SecAgg+ workflow and site mods, the
transport of tests/test_secagg_dropouts.py). The end-to-end case with a site killed by SIGKILL
is tests/test_faults_deploy.py."""

from __future__ import annotations

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg as FlowerFedAvg
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.supercore.task_identity import TaskIdentity

from fedtune.common.config import secagg_threshold
from fedtune.server.coordinator_run import describe_round
from fedtune.server.participation import ParticipationGrid, RoundParticipation
from fedtune.server.secagg import DropoutTolerantSecAggPlus, secagg_params
from tests.test_secagg_dropouts import LOST, NODES, STAGES, _Grid, _proxy

NAMES = {101: "hospital-a", 202: "hospital-b", 303: "hospital-c"}


def _round(lost_from: str | None, reply_error: bool) -> RoundParticipation:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cm = SimpleClientManager()
    for n in NODES:
        cm.register(_proxy(n))
    strategy = FlowerFedAvg(min_fit_clients=2, min_available_clients=3, accept_failures=True)
    ctx = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                run_config={}),
                        config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=cm)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(4), np.zeros((2, 3))]), True)
    tracker = RoundParticipation(NAMES)
    tracker.round = 1
    n = len(NODES)
    workflow = DropoutTolerantSecAggPlus(num_shares=n, reconstruction_threshold=secagg_threshold(n),
                                         **secagg_params(n, max_records=100))
    workflow(ParticipationGrid(_Grid(lost_from, reply_error), tracker), ctx)
    return tracker


@pytest.mark.parametrize("reply_error", [False, True], ids=["silent", "error"])
@pytest.mark.parametrize("lost_from", STAGES)
def test_a_site_lost_in_any_stage_is_named_as_dropped_with_why(lost_from, reply_error):
    tracker = _round(lost_from, reply_error)
    survivors = [NAMES[n] for n in NODES if n != LOST]
    sites = [{"site_id": s, "status": "ok"} for s in survivors]
    p = tracker.for_round(1, sites)
    assert p["trained"] == survivors
    assert list(p["dropped"]) == [NAMES[LOST]]
    why = p["dropped"][NAMES[LOST]]
    assert ("node unavailable" in why) if reply_error else why.startswith("no reply")


def test_no_dropout_names_no_one_and_unknown_nodes_by_id():
    tracker = _round(None, False)
    p = tracker.for_round(1, [{"site_id": NAMES[n], "status": "ok"} for n in NODES])
    assert p == {"trained": sorted(NAMES.values()), "declined": {}, "refused": {},
                 "dropped": {}}
    tracker = RoundParticipation()
    tracker.round = 2
    tracker.sent([7, 8])
    tracker.learn({8: "site-1"})
    p = tracker.for_round(2, [{"site_id": "site-1", "status": "budget_exhausted",
                               "reason": "the next round would exceed ε = 4"}])
    assert p["dropped"] == {"node 7": "no reply (the site died, lost its link, or timed out)"}
    assert p["declined"] == {"site-1": "budget_exhausted: the next round would exceed ε = 4"}


def test_the_coordinator_round_line_names_dropped_sites():
    rec = {"round": 3, "eval": {"loss": 0.5}, "sites": [
        {"site_id": "site-0", "status": "ok", "epsilon": 1.0}],
        "participation": {"trained": ["site-0"], "declined": {}, "refused": {},
                          "dropped": {"site-2": "no reply within 90 s"}}}
    line = describe_round(rec)
    assert "site-0: ε=1" in line and "dropped: site-2 (no reply within 90 s)" in line


def test_an_error_the_superlink_makes_for_a_node_names_that_node():
    """Flower's SuperLink answers for a node whose heartbeat lapsed from its own node id (1):
    the message it answers names the node."""
    from flwr.app import Error, Message

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    class Grid:
        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for i, m in enumerate(messages):
                m.metadata.__dict__["_message_id"] = f"msg-{i}"  # as the grid does when pushing
                if m.metadata.dst_node_id == LOST:
                    err = Message(Error(5, "Error: Node Unavailable"), reply_to=m)
                    err.metadata.__dict__["_src_node_id"] = 1  # SUPERLINK_NODE_ID
                    replies.append(err)
                else:
                    replies.append(Message(RecordDict(), reply_to=m))
            return replies

    tracker = RoundParticipation(NAMES)
    tracker.round = 1
    grid = ParticipationGrid(Grid(), tracker)
    grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="train")
                           for n in NODES])
    p = tracker.for_round(1, [{"site_id": NAMES[n], "status": "ok"} for n in NODES if n != LOST])
    assert p["dropped"] == {NAMES[LOST]: "Error: Node Unavailable"}


def test_a_simulated_worker_death_is_named_by_site_not_node_id():
    """A node the table does not know, whose error carries fedtune's site-failure tag (a
    simulated site's Ray worker died), is named by that site and cause."""
    from fedtune.server.outcome import site_failure_message
    from fedtune.server.participation import RoundParticipation

    p = RoundParticipation()
    p.round = 1
    p.sent([11, 12])
    p.learn({11: "site-0"})  # site-0 replied
    p.failed(12, "Error: " + site_failure_message("site-1", "its Ray worker died: killed"))
    got = p.for_round(1, [{"site_id": "site-0", "status": "ok"}])
    assert got["trained"] == ["site-0"]
    assert list(got["dropped"]) == ["site-1"]
    assert got["dropped"]["site-1"].endswith("[site-1] its Ray worker died: killed")
