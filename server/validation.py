"""Server-side validation of site updates, before anything is aggregated.

Called by `DeltaAggregation.aggregate_fit` (server/strategy/delta.py) for every reply that
carries an update. A reply is rejected, and logged with the site's id and the reason, when

- its adapter layout (the names and shapes of the trainable tensors, as a digest the site sends
  in its metrics, `adapter_layout`) differs from the server's: e.g. a site whose LoRA targets
  other modules of the same shape,
- it has the wrong number of tensors, a tensor of the wrong shape, or a dtype that is not
  float32/float64 (with `update_encoding = "fp32"`; encoded fp16/int8 replies are checked by
  the codec's own decoder, common/codec.py),
- a value is NaN or infinite,
- its L2 norm (over all tensors) is above `federation.max_update_norm`.

The round then goes on with the other sites, provided at least `federation.min_fit_sites` valid
updates remain; otherwise the round leaves the global adapter unchanged.

With SecAgg+ the server never sees an individual update: it sees only the unmasked aggregate
(the example-weighted mean). The aggregate is then validated once (shapes, finite values, the
norm bound: a mean of updates within the bound is within it too, so an aggregate above the bound
proves at least one bad update), and a failing aggregate discards the whole round: the culprit
cannot be singled out. The per-site metadata (layout digest) is still checked per site, since it
travels in plain text, and so does any mismatch it reveals. Each site also checks its own plain
update before masking it (client/supernode_app.py), which catches an honest site's numerical fault.
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
