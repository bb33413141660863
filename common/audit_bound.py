"""The epsilon lower bound of a one-run privacy audit (Steinke, Nasr & Jagielski, "Privacy
Auditing with One (1) Training Run", NeurIPS 2023).

m canaries are each included with probability 1/2. The auditor guesses inclusion for r of them
(the top k+ scores "in", the bottom k- "out", abstaining on the rest) and gets v right. Under
(eps, delta)-DP, Theorem 5.2 (their Algorithm 2 / Appendix D code) bounds

    P[correct >= v] <= P[Bin(r, p) >= v] + 2 m delta max_{i=1..v} P[v-i <= Bin(r, p) < v] / i

with p = e^eps / (1 + e^eps). The audited lower bound is the largest eps whose bound is <= beta:
the mechanism is NOT (eps, delta)-DP for any smaller eps, with confidence 1 - beta.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses right] under (epsilon, delta)-DP: Theorem 5.2 of the paper."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    p = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of eps-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, p))  # P[Binomial(r, p) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # alpha = max_i P[v - i <= Binomial(r, p) < v] / i, over i = 1..v
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[B = v-1], P[B = v-2], ...
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05,
                        tol: float = 1e-6) -> float:
    """Largest epsilon at which v right guesses out of r are still rejected at level beta
    (0 when even eps = 0 is not rejected). Bisection, as in the paper's `get_eps_audit`."""
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) <= beta:  # p_value grows with epsilon
        lo, hi = hi, 2 * hi
        if hi > 1e3:  # only reached when every guess is right and r is huge
            return lo
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) <= beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class AuditBound:
    """The audited lower bound and the guess that gave it."""

    epsilon: float  # lower bound, valid with confidence 1 - beta
    m: int  # canaries
    guesses: int  # r = k+ + k-
    correct: int  # v
    beta: float
    delta: float


def default_guess_counts(m: int) -> list[int]:
    """Guesses per side (k+ = k-) tried; fixed before looking at the scores."""
    return sorted({k for k in (m // 100, m // 50, m // 20, m // 10, m // 5, m // 2) if k >= 1})


def audit_bound(scores: Sequence[float], included: Sequence[bool], *, delta: float,
                beta: float = 0.05, guess_counts: Sequence[int] | None = None) -> AuditBound:
    """Guess "in" for the k highest scores and "out" for the k lowest, for each k in
    `guess_counts`, and return the best bound. Each k is tested at level beta / len(counts)
    (Bonferroni), so the best of them still holds with confidence 1 - beta; the paper instead
    reports the best k without a correction."""
    s = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(included, dtype=bool)
    m = len(s)
    if m != len(truth) or m == 0:
        raise ValueError(f"{len(s)} scores for {len(truth)} canaries")
    counts = [k for k in (guess_counts or default_guess_counts(m)) if 1 <= k <= m // 2]
    if not counts:
        raise ValueError(f"no valid guess count for {m} canaries")
    # Ties are broken at random so that equal scores carry no information.
    order = np.lexsort((np.random.default_rng().random(m), s))  # ascending
    level = beta / len(counts)
    found = []
    for k in counts:
        correct = int(truth[order[-k:]].sum() + (~truth[order[:k]]).sum())
        eps = epsilon_lower_bound(m, 2 * k, correct, delta, level)
        found.append(AuditBound(eps, m, 2 * k, correct, beta, delta))
    return max(found, key=lambda b: b.epsilon)  # the first (fewest guesses) among equals
