"""Checks of an adapter update's values, shared by the site (before it sends) and the server.

A site checks its own plain update before SecAgg+ masks it, because the server could not tell
whose a broken update was; the server checks every update it can see, and the aggregate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def check_values(arrays: Sequence[np.ndarray], max_norm: float | None) -> str | None:
    """Finite values, and the L2 norm over all tensors within `max_norm`."""
    sq = 0.0
    for i, a in enumerate(arrays):
        if not np.isfinite(np.sum(a, dtype=np.float64)):  # no temporary; float64 cannot overflow
            bad = "NaN" if np.isnan(a).any() else "Inf"
            return f"tensor {i} contains {bad} values"
        flat = a.ravel()
        sq += float(np.einsum("i,i->", flat, flat, dtype=np.float64))  # no float32 overflow
    norm = float(np.sqrt(sq))
    if max_norm is not None and not norm <= max_norm:
        return (f"L2 norm {norm:.4g} is above federation.max_update_norm = {max_norm:g}")
    return None
