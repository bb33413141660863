"""Client-side clipping for site-level central DP (Flower's DifferentialPrivacyClientSide*).

Flower's `fixedclipping_mod` / `adaptiveclipping_mod` clip `reply - received`, i.e. they assume the
reply is the site's *weights*. fedtune sites reply with the *delta*, so the site clips the delta
itself, with Flower's own clipping function, before the payload is hashed into the ledger:
what is recorded is exactly what leaves the site.
"""

from __future__ import annotations

import numpy as np
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    KEY_NORM_BIT,
    compute_adaptive_clip_model_update,
)


def clip_delta_if_asked(delta: list[np.ndarray], config: dict) -> dict:
    """Clip `delta` in place to the L2 norm the server's wrapper sent (if it sent one).

    Returns the metrics the adaptive wrapper needs (whether the update was clipped), which the
    fixed-clipping wrapper ignores.
    """
    if KEY_CLIPPING_NORM not in config:
        return {}
    clipping_norm = float(config[KEY_CLIPPING_NORM])
    if not any(np.any(d) for d in delta):  # nothing to clip (and Flower would divide by 0)
        return {KEY_NORM_BIT: False}
    zeros = [np.zeros_like(d) for d in delta]
    clipped = compute_adaptive_clip_model_update(delta, zeros, clipping_norm)
    return {KEY_NORM_BIT: bool(clipped)}
