"""Server-side validation of site updates, before anything is aggregated.

A reply is rejected (logged with the site's id and the reason) for a foreign adapter layout,
wrong tensor count, shape or dtype, non-finite values, or an L2 norm above
`federation.max_update_norm`. Under SecAgg+ only the unmasked aggregate can be checked, and a
failing aggregate discards the round. Details: docs/internals.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtune.common.codec import CodecError, decode
from fedtune.common.lora import LAYOUT_METRIC
from fedtune.common.update_checks import check_values

ACCEPTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class UpdateChecks:
    """What the server checks; built from the run config and the server's model."""

    shapes: tuple[tuple[int, ...], ...] = ()
    max_norm: float | None = None
    layout: str | None = None  # the server's adapter_layout digest (None: not checked)
    secagg: bool = False
    # federation.min_fit_sites: fewer valid updates than this leave the adapter unchanged
    min_updates: int = 1


@dataclass(frozen=True)
class Rejection:
    site_id: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"site_id": self.site_id, "reason": self.reason}


def site_of(metrics: Mapping[str, Any]) -> str:
    return str(metrics.get("site_id", "?"))


def check_metadata(metrics: Mapping[str, Any], checks: UpdateChecks) -> str | None:
    """Problems visible in a reply's metrics (plain text, also with SecAgg+)."""
    layout = metrics.get(LAYOUT_METRIC)
    if checks.layout is not None and layout is not None and str(layout) != checks.layout:
        return (f"adapter layout {layout} differs from the server's {checks.layout} (other "
                "tensor names or shapes: the site's LoRA settings or model differ)")
    return None


def check_structure(arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]]) -> str | None:
    """Tensor count, shapes and dtypes of a plain (fp32-encoded) update."""
    if len(arrays) != len(shapes):
        return f"update has {len(arrays)} tensors, the adapter has {len(shapes)}"
    for i, (a, shape) in enumerate(zip(arrays, shapes, strict=True)):
        if a.dtype not in ACCEPTED_DTYPES:
            return f"tensor {i} has dtype {a.dtype}, expected float32"
        if tuple(a.shape) != tuple(shape):
            return f"tensor {i} has shape {tuple(a.shape)}, expected {tuple(shape)}"
    return None


def validate_update(
    arrays: Sequence[np.ndarray], encoding: str, metrics: Mapping[str, Any], checks: UpdateChecks,
) -> tuple[list[np.ndarray] | None, str | None]:
    """(decoded float32 delta, None) for a valid update, (None, reason) otherwise."""
    if (problem := check_metadata(metrics, checks)) is not None:
        return None, problem
    if encoding == "fp32" and (problem := check_structure(arrays, checks.shapes)) is not None:
        return None, problem
    try:
        delta = decode(arrays, encoding, checks.shapes)
    except CodecError as e:
        return None, str(e)
    if (problem := check_values(delta, checks.max_norm)) is not None:
        return None, problem
    return delta, None


def validate_aggregate(arrays: Sequence[np.ndarray], checks: UpdateChecks) -> str | None:
    """SecAgg+: the unmasked aggregate (the weighted mean of the deltas)."""
    problem = check_structure(arrays, checks.shapes) or check_values(arrays, checks.max_norm)
    return None if problem is None else f"the SecAgg+ aggregate failed validation: {problem}"
