"""SecAgg+ fixed-point parameters (server/secagg.py) against Flower's own quantizer.

The end-to-end check (SecAgg+ aggregate == plain aggregate within the bound, over real
SuperNodes) is in test_deploy.py; these are the fast properties behind the parameter choice.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedtune.server.secagg import (
    MODULUS_RANGE,
    aggregate_error_bound,
    quantization_bits,
    secagg_params,
)


@pytest.mark.parametrize("sites", [2, 3, 8, 9, 100, 1000])
def test_sum_of_all_sites_cannot_overflow(sites: int):
    p = secagg_params(sites)
    # every site's encoded value is <= quantization_range; their sum must stay below the 2**32
    # modulus (with one bit to spare)
    assert sites * p["quantization_range"] <= 2**31 < MODULUS_RANGE == p["modulus_range"]
    assert quantization_bits(sites) >= 20 or sites > 1000


def test_float64_input_reaches_the_quantization_grid_float32_does_not():
    rng = np.random.default_rng(0)
    p = secagg_params(3)
    step = 2 * p["clipping_range"] / p["quantization_range"]
    delta = rng.normal(0, 2e-3, size=20_000)  # LoRA-delta-sized values

    def roundtrip(x):
        q = quantize([x], p["clipping_range"], p["quantization_range"])
        return dequantize(q, p["clipping_range"], p["quantization_range"])[0]

    err64 = np.abs(roundtrip(delta.astype(np.float64)) - delta).max()
    err32 = np.abs(roundtrip(delta.astype(np.float32)) - delta.astype(np.float32)).max()
    assert err64 <= step * 1.0001
    assert err32 > 4 * step  # why the site hands SecAgg+ float64 (client/supernode_app.py)


def test_error_bound_formula():
    p = secagg_params(3, clip=1.0, max_records=100)
    bound = aggregate_error_bound(p, [36, 36, 36])
    step = 2.0 / p["quantization_range"]
    assert bound == pytest.approx(3 * step * 100 / 108, rel=0.02)
    # a larger declared max_records costs precision in proportion
    assert aggregate_error_bound(secagg_params(3, max_records=10_000), [36] * 3) == \
        pytest.approx(100 * bound, rel=0.02)
