"""What a one-run audit (m = 1000, fedtune's guess grid + Bonferroni) can show on a q = 1,
10-step Gaussian mechanism with sigma as the trainer-level benchmark calibrates it, when the
score is the exact sufficient statistic (simulated Gaussian scores; 200 runs). The ceiling of
the white-box rows of results/audit.md at q = 1:

    python -m benchmarks.audit_ceiling
"""
import numpy as np

from fedtune.common.audit_bound import audit_bound
from fedtune.common.privacy import calibrate_noise

rng = np.random.default_rng(7)
for eps in (1, 2, 4, 8):
    sigma = calibrate_noise(eps, 1e-5, 1.0, 10)
    mu = np.sqrt(10) / sigma
    b = []
    for _ in range(200):
        inc = rng.random(1000) < 0.5
        b.append(audit_bound(inc * mu + rng.normal(size=1000), inc, delta=1e-5).epsilon)
    b = np.array(b)
    print(f"eps={eps} sigma={sigma:.3g} mu={mu:.3g}: bound median {np.median(b):.2f} "
          f"[5%, 95%] [{np.percentile(b, 5):.2f}, {np.percentile(b, 95):.2f}]")
inc = np.arange(1000) < 500
best = audit_bound(inc.astype(float), inc, delta=1e-5).epsilon
print(f"every guess right, m = 1000: {best:.2f}")
