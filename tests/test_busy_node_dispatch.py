"""fedtune's message extractor for Flower's simulation engine delivers what Flower's loop does.

Both loops run against a real in-memory link state set up as `run_simulation` sets it up
(`busy_node_dispatch.link_state_with_mail`). Their CPU cost is a benchmark, not a test.
"""

from __future__ import annotations

from flwr.server.superlink.fleet.vce import vce_api

from fedtune.simulations import busy_node_dispatch
from fedtune.simulations.busy_node_dispatch import FLOWER_LOOP, run_loop


def test_busy_node_polling_delivers_the_same_messages_as_flowers_loop() -> None:
    # 300 nodes, mail for 7 of them (one node twice: one message per node per poll, so its
    # second comes a poll later), the rest idle.
    mail = [0, 3, 3, 57, 120, 121, 299]
    got_flower, _ = run_loop(FLOWER_LOOP, 300, mail, seconds=0.6)
    got_ours, _ = run_loop(busy_node_dispatch.poll_busy_nodes, 300, mail, seconds=0.6)
    assert got_flower == sorted(mail)
    assert got_ours == got_flower  # each message once, none to an idle node


def test_idle_federation_gets_nothing() -> None:
    got, _ = run_loop(busy_node_dispatch.poll_busy_nodes, 50, [], seconds=0.3)
    assert got == []


def test_install_points_flowers_engine_at_it() -> None:
    original = vce_api.add_messages_to_queue
    try:
        busy_node_dispatch.install()
        assert vce_api.add_messages_to_queue is busy_node_dispatch.poll_busy_nodes
    finally:
        vce_api.add_messages_to_queue = original
