"""Streaming FedAvg of adapter deltas: a running weighted sum, one update in memory at a time.

    new_global = global + sum_k n_k delta_k / sum_k n_k

Each update is decoded, scaled in place and added to one float32 accumulator, then dropped, so
the extra memory is the accumulator plus the update being added (2x one update), whatever the
number of sites; the result is written into the accumulator (no third copy). Flower's legacy path
still keeps every site's serialised reply (`FitRes`) until the round ends: that is the input,
not something the aggregation adds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

NDArrays = list[np.ndarray]


class WeightedDeltaSum:
    """sum_k w_k delta_k and sum_k w_k, accumulated one update at a time (float32)."""

    def __init__(self) -> None:
        self.acc: NDArrays | None = None
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: Sequence[np.ndarray], weight: float, *, owned: bool = False) -> None:
        """Add `weight * delta`. With `owned`, `delta`'s float32 arrays are scaled in place
        (no temporary); pass it for arrays decoded just for this call."""
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        w = np.float32(weight)
        if self.acc is None:
            self.acc = [
                _scaled_copy(d, w, owned) for d in delta
            ]
        else:
            if len(delta) != len(self.acc):
                raise ValueError(f"update has {len(delta)} tensors, expected {len(self.acc)}")
            for a, d in zip(self.acc, delta, strict=True):
                if a.shape != np.shape(d):
                    raise ValueError(f"update tensor shape {np.shape(d)} != {a.shape}")
                if owned and _writable_f32(d):
                    d *= w
                    a += d
                else:
                    a += w * np.asarray(d, dtype=np.float32)
        self.total_weight += float(weight)
        self.count += 1

    def apply_to(self, global_adapter: Sequence[np.ndarray]) -> NDArrays:
        """global + sum / total, computed in the accumulator (which is then consumed)."""
        if self.acc is None:
            raise ValueError("no update was added")
        out, self.acc = self.acc, None
        inv = np.float32(1.0 / self.total_weight)
        for a, g in zip(out, global_adapter, strict=True):
            a *= inv
            a += np.asarray(g, dtype=np.float32)
        return out


def _writable_f32(a: object) -> bool:
    return isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.writeable


def _scaled_copy(d: np.ndarray, w: np.float32, owned: bool) -> np.ndarray:
    if owned and _writable_f32(d):
        d *= w
        return d
    return np.asarray(d, dtype=np.float32) * w


def streaming_mean(
    global_adapter: Sequence[np.ndarray], updates: Iterable[tuple[Sequence[np.ndarray], float]],
    *, owned: bool = True,
) -> tuple[NDArrays, int]:
    """New global adapter from lazily produced (delta, weight) pairs, and how many were added.

    `updates` is consumed one pair at a time (pass a generator that decodes each reply), so at
    most one update is alive besides the accumulator.
    """
    acc = WeightedDeltaSum()
    for delta, weight in updates:
        acc.add(delta, weight, owned=owned)
        del delta
    if acc.count == 0:
        raise ValueError("no update to aggregate")
    return acc.apply_to(global_adapter), acc.count
