"""Server aggregation memory and time for a 7B-shaped LoRA (r=16 on every linear layer of a
32-layer, 4096-wide Llama: q, k, v, o 4096x4096; gate, up 4096->11008; down 11008->4096).

1. Same inputs (N real serialised replies, as Flower hands them over), fedtune's delta path
   before (every reply rebuilt as global + delta, then Flower's FedAvg) and after (streaming
   weighted sum, server/aggregation.py): extra memory beyond the inputs, and time.
2. 100 replies produced one at a time (as they would arrive) into the streaming path that
   fedtune's FedAvg uses (`DeltaAggregation._streaming_fedavg`): peak memory vs one update.

Memory is Python's tracemalloc peak (numpy and bytes allocations), minus what was allocated
before the call.

    python benchmarks/bench_aggregation.py --before-n 4 8 --stream-n 100
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import tracemalloc
from collections.abc import Iterator

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedtune.server.strategy import FedAvg


def lora_shapes(layers: int = 32, width: int = 4096, ffn: int = 11008,
                r: int = 16) -> list[tuple[int, int]]:
    mods = [(width, width)] * 4 + [(width, ffn)] * 2 + [(ffn, width)]  # (in, out)
    shapes = []
    for _ in range(layers):
        for d_in, d_out in mods:
            shapes += [(r, d_in), (d_out, r)]  # lora_A, lora_B
    return shapes


def reply(shapes: list[tuple[int, int]], seed: int) -> tuple[None, FitRes]:
    rng = np.random.default_rng(seed)
    delta = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    for d in delta:
        d *= 1e-3
    params = ndarrays_to_parameters(delta)
    del delta
    return None, FitRes(Status(Code.OK, ""), params, 100 + seed, {"site_id": f"s{seed}"})


class LazyReplies:
    """Iterating yields `n` replies one at a time, cycling through a few payloads serialised
    beforehand (so that making replies costs neither memory nor time inside the measurement)."""

    def __init__(self, pool: list[tuple[None, FitRes]], n: int) -> None:
        self.pool, self.n = pool, n

    def __iter__(self) -> Iterator[tuple[None, FitRes]]:
        for k in range(self.n):
            _, res = self.pool[k % len(self.pool)]
            yield None, FitRes(res.status, res.parameters, 100 + k, {"site_id": f"s{k}"})

    def __len__(self) -> int:
        return self.n


class BeforeFedAvg(FedAvg):
    """fedtune's delta path before streaming: rebuild every reply, then Flower's FedAvg."""

    def _streams_mean(self) -> bool:
        return False


def strategy(cls: type, shapes: list[tuple[int, int]]) -> FedAvg:
    g = [np.zeros(s, np.float32) for s in shapes]
    s = cls(initial_parameters=ndarrays_to_parameters(g))
    s.initialize_parameters(client_manager=None)
    return s


def measure(fn) -> tuple[float, float]:
    """(seconds, tracemalloc peak bytes above the start) of fn()."""
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    del out
    gc.collect()
    return dt, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before-n", type=int, nargs="*", default=[4, 8])
    p.add_argument("--stream-n", type=int, default=100)
    p.add_argument("--layers", type=int, default=32)
    a = p.parse_args()
    shapes = lora_shapes(layers=a.layers)
    params = sum(x * y for x, y in shapes)
    one = params * 4
    print(f"7B-shaped LoRA: {len(shapes)} tensors, {params / 1e6:.1f} M params, "
          f"one update {one / 2**20:.0f} MiB fp32; load average {os.getloadavg()[0]:.2f}")
    for n in a.before_n:
        replies = [reply(shapes, k) for k in range(n)]
        for label, cls in (("before (rebuild + Flower FedAvg)", BeforeFedAvg),
                           ("after  (streaming weighted sum)", FedAvg)):
            s = strategy(cls, shapes)
            dt, peak = measure(lambda s=s, r=replies: s.aggregate_fit(1, r, []))
            print(f"  N={n:3d} {label}: extra peak {peak / 2**20:7.0f} MiB = "
                  f"{peak / one:5.2f}x one update; {dt:6.2f} s ({dt / n * 1e3:.0f} ms/update)",
                  flush=True)
        ref = parameters_to_ndarrays(
            strategy(BeforeFedAvg, shapes).aggregate_fit(1, replies, [])[0])
        got = parameters_to_ndarrays(strategy(FedAvg, shapes).aggregate_fit(1, replies, [])[0])
        err = max(float(np.max(np.abs(x - y))) for x, y in zip(ref, got, strict=True))
        print(f"         max |before - after| = {err:.2e}")
        del replies, ref, got
        gc.collect()
    if a.stream_n <= 0:
        return
    pool = [reply(shapes, k) for k in range(3)]
    s = strategy(FedAvg, shapes)
    dt, peak = measure(lambda: s._streaming_fedavg(1, LazyReplies(pool, a.stream_n), []))
    print(f"  N={a.stream_n} replies through fedtune FedAvg's streaming path: extra peak "
          f"{peak / 2**20:.0f} MiB = {peak / one:.2f}x one update (target <= 3x); {dt:.1f} s "
          f"({dt / a.stream_n * 1e3:.0f} ms/update: decode + multiply-add); load average "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
