"""The guarantees of a report in plain language, for a compliance officer."""

from __future__ import annotations

import math

MECHANISM = (
    "DP-SGD (Abadi et al. 2016) as implemented by Opacus: in every local step each record joins "
    "the batch independently with probability q (Poisson sampling), each record's gradient is "
    "clipped to L2 norm C, and Gaussian noise of standard deviation σ·C is added to their sum. "
    "Only the LoRA adapter is trained; the base model never changes."
)

ACCOUNTANTS = {
    "rdp": "RDP — Rényi differential privacy accountant (Mironov 2017), an upper bound",
    "prv": "PRV — privacy random variable accountant (Gopi et al. 2021), a tighter numerical "
           "upper bound",
}


def _odds(eps: float) -> str:
    if not math.isfinite(eps):
        return "unbounded"
    factor = math.exp(eps)
    return f"{factor:.3g}" if factor < 1e6 else f"{factor:.2e}"


WEAK = 10.0  # above this epsilon the bound says little; say so rather than quote e^eps


def _weak(eps: float) -> str:
    return (f" Note: ε = {eps:.3g} is large; a guarantee this weak gives little practical "
            "protection." if eps > WEAK else "")


def sample_level(site: dict, run: dict | None, eps: float) -> str:
    """One site's sample-level guarantee over the whole run (all rounds composed)."""
    sid, delta = site["site_id"], site["delta"]
    rounds = run["rounds_trained"] if run else 0
    if run and run.get("sent_without_dp"):
        return (f"NO differential privacy guarantee: {sid} sent {len(run['sent_without_dp'])} "
                "model update(s) trained without DP-SGD (dp.enabled = false). They may reveal "
                "information about individual records.")
    if not rounds:
        return (f"{sid} trained no round in this run: no update computed from its data left the "
                "site, so this run revealed nothing about its records.")
    return (
        f"For every single record held by {sid}, the model updates {sid} sent during this run "
        f"({rounds} round{'s' if rounds != 1 else ''}, all composed) satisfies "
        f"(ε = {eps:.3g}, δ = {delta:g})-differential privacy. In plain words: whoever sees "
        f"those updates — the coordinator, the other sites, or anyone who obtains the final "
        f"model — cannot become more than {_odds(eps)} times more confident (e^ε) about whether "
        f"any one record was in {sid}'s data than they were before, except with probability "
        f"at most δ = {delta:g}. This holds whatever they know besides.{_weak(eps)}"
    )


def site_total(site: dict) -> str:
    if site["delta"] is None:
        return f"{site['site_id']}'s ledger holds no DP round."
    acc = site["accountant"]
    eps = site["epsilon_total"][acc]
    runs = sum(1 for r in site["runs"] if r["rounds"])
    where = ("the one run" if runs == 1 else f"all {runs} runs") + " recorded in its ledger"
    text = f"Across {where}, {site['site_id']}'s total is ε = {eps:.3g} at δ = {site['delta']:g}"
    if site["budget_max_epsilon"]:
        text += (f", {site['budget_used']:.0%} of its budget ε = "
                 f"{site['budget_max_epsilon']:g}")
    return text + "."


def site_level(central: dict) -> str:
    eps, delta = central["epsilon_rdp"], central["delta"]
    trust = (
        "The coordinator clips each site's update itself, so it sees the individual updates and "
        "is trusted to add the noise."
        if central["side"] == "server" else
        "Each site clips its own update before sending it; the coordinator adds the noise."
    )
    return (
        f"Site-level (central) DP: the sequence of global adapters released after each round "
        f"satisfies (ε = {eps:.3g}, δ = {delta:g})-differential privacy with respect to a whole "
        f"site joining the federation or not. Nobody who sees only the global adapters can be "
        f"more than {_odds(eps)} times more confident about whether any one site took part, "
        f"except with probability δ. {trust}{_weak(eps)}"
    )


NEVER_DATA = (
    "What left each site, per round, is one model update (the LoRA adapter difference, or an "
    "all-zero update when the site declined) and a few numbers: its record count, its mean "
    "training loss and its ε. These numbers are not protected by the DP guarantee above (they "
    "are aggregate statistics, sent in clear). Records, per-example gradients and the site's "
    "data never leave the site. The size and SHA-256 "
    "fingerprint below were written into the site's ledger (and fsync'ed) before the update "
    "was sent; they identify exactly what was sent without revealing it. The site also reports "
    "the hash with its update; the last column says whether the server's log (metrics.jsonl) "
    "holds the same hash for that round."
)
