"""SecAgg+ fixed-point encoding parameters for DP-noised LoRA deltas.

Chooses the clipping and quantization ranges of Flower's SecAgg+ so that a LoRA delta is
neither clipped nor overflows the 2**32 modulus, and bounds the error this adds to the
aggregate (`aggregate_error_bound`). Derivation: docs/internals.md.
"""

from __future__ import annotations

import math

from flwr.server.workflow import SecAggPlusWorkflow

MODULUS_RANGE = 2**32
MAX_BITS = 28
DEFAULT_CLIP = 1.0
DEFAULT_MAX_RECORDS = 10_000


def quantization_bits(num_sites: int) -> int:
    return max(8, min(MAX_BITS, 31 - math.ceil(math.log2(max(2, num_sites)))))


def secagg_params(num_sites: int, *, clip: float = DEFAULT_CLIP,
                  max_records: int = DEFAULT_MAX_RECORDS) -> dict:
    """Keyword arguments for `SecAggPlusWorkflow` (besides num_shares / threshold)."""
    return {
        "clipping_range": float(clip),
        "quantization_range": 2 ** quantization_bits(num_sites),
        "modulus_range": MODULUS_RANGE,
        "max_weight": float(max_records),
    }


def aggregate_error_bound(params: dict, records: list[int]) -> float:
    """Worst-case per-coordinate difference between the SecAgg+ and the plain weighted mean."""
    step = 2 * params["clipping_range"] / params["quantization_range"]
    # Each site's ratio is itself rounded to a multiple of 1/quantization_range.
    return len(records) * step * params["max_weight"] / max(1, sum(records)) * 1.01 + 1e-12


class DropoutTolerantSecAggPlus(SecAggPlusWorkflow):
    """Flower 1.39's SecAgg+ workflow, except that a site dropping out *before* it has shared its
    keys (in the setup or share-keys stage) no longer voids the round.

    Flower's unmask stage takes every *sampled* node that did not send a masked vector as a
    dropout whose pairwise masks must be removed (flwr/server/workflow/secure_aggregation/
    secaggplus_workflow.py, `unmask_stage`: `dead_nids = state.sampled_node_ids - active_nids`),
    asks the survivors for that node's key shares, and needs `threshold` shares of every sampled
    node. A node that dropped before the share-keys stage completed never sent shares (and no
    survivor masked its vector with it): every survivor fails on the missing share
    (flwr/client/mod/secure_aggregation/secaggplus_mod.py, `_unmask`:
    `state.sk1_share_dict[nid]`, KeyError), the server has no shares for that node ("Not enough
    shares to recover secret in unmask vectors stage") and the round is void. As in the SecAgg+
    protocol (Bell et al., 2020), only the nodes that shared their keys take part in unmasking:
    after the share-keys stage, the nodes still active are the ones the later stages account
    for. A dropout in the later stages (collect masked vectors, unmask) was already tolerated.
    """

    def share_keys_stage(self, grid, context, state) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        state.sampled_node_ids = set(state.active_node_ids)
        return ok
