"""SecAgg+ fixed-point encoding parameters for DP-noised LoRA deltas.

Flower's SecAgg+ (1.39) encodes each site's update as integers before masking:

1. the site multiplies its delta by its weight ratio `r_i = n_i / max_weight` (n_i = records),
2. clips every coordinate to [-clipping_range, clipping_range],
3. maps it to [0, quantization_range] with unbiased stochastic rounding, and the masked sum is
   taken modulo `modulus_range` (2**32).

The server unmasks the sum and divides by the sum of the ratios: the example-weighted mean of
the deltas, i.e. FedAvg. Two things can go wrong, and the parameters below prevent both:

- *Clipping*: a coordinate of `r_i * delta_i` beyond `clipping_range` is silently clipped.
  LoRA deltas after a few DP-SGD steps are far below 1 per coordinate (AdamW moves a weight by
  about `lr` per step; the Gaussian noise is averaged over the batch), and `r_i <= 1`, so
  `clipping_range = 1.0` leaves a wide margin; it is configurable (`federation.secagg_clip`).
- *Overflow*: the sum of N sites' integers must stay below 2**32, so the quantization range is
  `2**bits` with `bits = min(28, 31 - ceil(log2 N))` (24 bits for 100 sites, 28 for up to 8).

The site hands its delta to SecAgg+ in float64 (client/supernode_app.py): Flower's quantizer
computes `delta + clipping_range` in the input's dtype, and float32 would limit the precision to
about `clipping_range * 2**-24` whatever the quantization range.

The error this adds to the aggregate is at most `N * (2 * clipping_range / 2**bits) *
max_weight / sum(n_i)` per coordinate (one quantization step per site, rescaled), and in
expectation zero: `aggregate_error_bound` computes it. `max_weight` must be at least the largest
site's record count (otherwise `r_i > 1` and deltas may be clipped); it defaults to
`federation.secagg_max_records`.
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
