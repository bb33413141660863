"""CPU that Flower's simulation engine spends handing out messages, by number of simulated sites.

Builds the link state as `flwr.simulation.run_simulation` does (N registered nodes, one run),
stores one message for each of `--mail` sites (the sites sampled in a round) and runs the
engine's message-extractor loop in a thread for `--seconds`: Flower 1.39's
`vce_api.add_messages_to_queue` against fedtune's `simulations/busy_node_dispatch.poll_busy_nodes`.
The messages stay in the store once delivered (until their replies are pulled), as during a
round, so this is what the loop costs all through a round. Prints the loop thread's CPU
share (1.0 = one core busy) and checks both loops delivered the same messages.

    python benchmarks/bench_dispatch.py --sites 10 100 1000
"""

from __future__ import annotations

import argparse

from fedtune.simulations.busy_node_dispatch import FLOWER_LOOP, poll_busy_nodes, run_loop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--mail", type=int, default=10, help="sites with a message (sampled)")
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()
    print(f"{'sites':>6} {'Flower loop':>12} {'fedtune loop':>13}  (CPU share of one core)")
    for n in a.sites:
        mail = list(range(0, n, max(1, n // a.mail)))[: a.mail]
        got_flower, cpu_flower = run_loop(FLOWER_LOOP, n, mail, a.seconds)
        got_ours, cpu_ours = run_loop(poll_busy_nodes, n, mail, a.seconds)
        same = got_flower == got_ours == sorted(mail)
        print(f"{n:6d} {cpu_flower:12.3f} {cpu_ours:13.3f}  same deliveries: {same}", flush=True)


if __name__ == "__main__":
    main()
