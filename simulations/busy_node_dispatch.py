"""Flower's simulation engine hands out messages by polling every node; poll only busy ones.

Flower 1.39's `vce_api.add_messages_to_queue` asks the link state for each of the N simulated
nodes' next message, ten times a second, for the whole run. Each ask scans every stored message
(`InMemoryLinkState.get_message_ins`), so with 1,000 sites and 10 of them sampled per round the
engine thread checks 10,000 (node, message) pairs every 0.1 s: 0.40 of a core all through a
round (benchmarks/bench_dispatch.py; 0.003 with this loop), on a 2-core machine where the two
training workers need both cores (results/RESULTS.md).

`poll_busy_nodes` is the same loop over only the nodes that have an undelivered message:
one scan of the store per poll instead of N. Delivery still goes through `get_message_ins`
(same per-message checks, same one-message-per-node-per-poll order), so what each node
receives, and when, is unchanged. Any other link state keeps Flower's loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from queue import Queue

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

POLL_SECONDS = 0.1  # Flower's interval
FLOWER_LOOP = vce_api.add_messages_to_queue  # kept for the comparison below


def _nodes_with_mail(state: LinkState, nodes: dict[int, int]) -> list[int]:
    """The simulated nodes, in Flower's order, that have a message not yet delivered."""
    if not isinstance(state, InMemoryLinkState):
        return list(nodes)
    with state.lock:
        waiting = {m.metadata.dst_node_id for m in list(state.message_ins_store.values())
                   if m.metadata.delivered_at == ""}
    if not waiting:
        return []
    return [n for n in nodes if n in waiting]


def poll_busy_nodes(
    state: LinkState, queue: Queue[Message], nodes_mapping: dict[int, int],
    f_stop: threading.Event,
) -> None:
    """Drop-in for `vce_api.add_messages_to_queue` (same arguments, same deliveries)."""
    while not f_stop.is_set():
        for node_id in _nodes_with_mail(state, nodes_mapping):
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(POLL_SECONDS)


def install() -> None:
    """Make Flower's simulation engine use `poll_busy_nodes` (read by `run_api` at each run)."""
    vce_api.add_messages_to_queue = poll_busy_nodes


# Checking it (tests/test_vce_dispatch.py, benchmarks/bench_dispatch.py): either loop against a
# real link state with mail for some of its nodes.

def link_state_with_mail(num_nodes: int, mail_to: list[int]):
    """(link state, node id -> partition id) with one message stored for each partition id in
    `mail_to`, set up the way Flower's simulation sets up its in-memory link state."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    nodes = vce_api._register_nodes(num_nodes, factory)  # what run_simulation calls
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 9, NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[9] = Task(task_id=9, run_id=run.run_id)
    TaskIdentity.task_id, TaskIdentity.run_id = 9, run.run_id  # as run_simulation sets them
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    node_of = {p: n for n, p in nodes.items()}
    grid.push_messages([Message(RecordDict(), node_of[p], "train") for p in mail_to])
    return state, nodes


def run_loop(loop: Callable, num_nodes: int, mail_to: list[int],
             seconds: float) -> tuple[list[int], float]:
    """(partition ids the loop delivered to, the loop thread's CPU share over `seconds`)."""
    state, nodes = link_state_with_mail(num_nodes, mail_to)
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    cpu: list[float] = []

    def measured() -> None:
        loop(state, queue, nodes, stop)
        cpu.append(time.thread_time())  # this thread's CPU seconds, all spent in the loop

    thread = threading.Thread(target=measured)
    thread.start()
    time.sleep(seconds)
    stop.set()
    thread.join()
    delivered = sorted(nodes[m.metadata.dst_node_id] for m in list(queue.queue))
    return delivered, cpu[0] / seconds
