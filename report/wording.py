"""The guarantees of a report in plain language, for a compliance officer."""

from __future__ import annotations

import math

MECHANISM = (
    "DP-SGD (Abadi et al. 2016) as implemented by Opacus: in every local step each record joins "
    "the batch independently with probability q (Poisson sampling), each record's gradient is "
    "clipped to L2 norm C, and Gaussian noise of standard deviation σ·C is added to their sum. "
    "What a site trains and sends is the LoRA adapter and, in a classification run, the "
    "classification head on top of the model (a new layer, started from the label names); both "
    "are clipped and noised together, as one gradient. The pretrained model's own weights never "
    "change."
)

PERSON_MECHANISM = (
    "With a person-level privacy unit (data.privacy_unit = a column such as patient_id), the "
    "same mechanism runs over persons: user-level DP-SGD with user-level sampling (Charles et al. "
    "2024, \"Fine-Tuning Large Language Models with User-Level Differential Privacy\"). In every "
    "step each person joins the batch independently with probability q with all of their "
    "records (or a bounded number of them, drawn at random), the mean of one person's record "
    "gradients is clipped to L2 norm C, and the noise is added to the sum over persons; ε is "
    "accounted over persons and δ is below 1/persons."
)


def unit_label(site: dict) -> str:
    """How a site's guarantee is counted: "per person (column X)" or "per record"."""
    unit = site.get("privacy_unit") or "record"
    return "per record" if unit == "record" else f"per person (column {unit})"


def group_bound(site: dict) -> str:
    """A record-level run's bound for its largest person (group privacy), or ""."""
    g = site.get("group_bound")
    if not g:
        return ""
    if g["k"] <= 1:
        return (f" Every person (column {g['column']}) has a single record at "
                f"{site['site_id']}, so this guarantee also holds per person.")
    delta = (f"δ = {g['group_delta']:.3g}" if g["group_delta"] < 1
             else f"δ = {g['group_delta']:.3g} ≥ 1, i.e. no guarantee at all")
    return (f" This guarantee is per record, and {site['site_id']}'s data has several records "
            f"per person (column {g['column']}): its largest person has k = {g['k']} records, "
            f"and group privacy (Dwork & Roth 2014, §2.3; for (ε, δ): (kε, k·e^((k−1)ε)·δ)) "
            f"protects that person's records together only at ε = {g['group_epsilon']:.3g}, "
            f"{delta}. For a guarantee per person, train with data.privacy_unit = "
            f"\"{g['column']}\".")


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


def retries(run: dict | None) -> str:
    """The rounds a run retried, in words ("round 2 retried once"), or ""."""
    parts = [f"round {r['round']} retried " + ("once" if r["retries"] == 1
                                                else f"{r['retries']} times")
             for r in (run or {}).get("retried") or []]
    return ", ".join(parts)


def rounds_label(run: dict | None) -> str:
    """Rounds trained, retries said: "3 (round 2 retried once)"; a retry is a second spend."""
    n = run["rounds_trained"] if run else 0
    return f"{n} ({retries(run)})" if retries(run) else str(n)


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
    unit = site.get("privacy_unit") or "record"
    if unit == "record":
        who, one, with_it, what = (f"every single record held by {sid}", "per record",
                                   "that record", "any one record was")
    else:
        who = (f"every person at {sid} (all of the records that share one value of the column "
               f"{unit}, e.g. a patient with all of their notes)")
        one, with_it, what = (f"per person (column {unit})", "that person's records",
                              "any one person's records were")
    return (
        f"Guarantee {one}. For {who}, the model updates {sid} sent during this run "
        f"({rounds} round{'s' if rounds != 1 else ''}"
        + (f" — {retries(run)}, each attempt counted —" if retries(run) else ",")
        + " all composed) satisfy "
        f"(ε = {eps:.3g}, δ = {delta:g})-differential privacy: for any set of possible "
        f"updates, the probability that they fall in it with {with_it} in {sid}'s data is at "
        f"most e^ε = {_odds(eps)} times the probability without it, plus δ = {delta:g}. In "
        f"plain words: whoever sees those updates — the coordinator, the other sites, or anyone "
        f"who obtains the final model — learns little about whether {what} there, "
        f"whatever they know about the rest. This rests on {sid} drawing its sampling "
        f"and noise in secret; it does not cover the values {sid} sent in clear (listed "
        f"below), nor the attacks listed under the threat model.{_weak(eps)}"
        f"{group_bound(site) if unit == 'record' else ''}{_seeded(sid, run)}"
    )


def _seeded(sid: str, run: dict | None) -> str:
    """The caveat of a run whose sampling and noise were not (or not known to be) secret."""
    seeded = (run or {}).get("seeded_rounds") or []
    unknown = (run or {}).get("randomness_unknown_rounds") or []
    if seeded:
        return (f" WARNING: in {len(seeded)} round(s) of this run {sid} drew its batches and "
                "noise from the run's seed (dp.reproducible_seed, for reproducible "
                "simulations), not in secret: the guarantee does not hold against whoever knows "
                "the seed, the coordinator included.")
    if unknown:
        return (f" WARNING: {sid}'s ledger does not record whether its batches and noise were "
                f"secret in {len(unknown)} round(s) of this run (an older fedtune, which seeded "
                "them from the run's seed): the guarantee may not hold against whoever knows "
                "that seed.")
    return ""


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


DELTA_MEANING = (
    "δ is the additive slack of the (ε, δ) guarantee: for any set of outcomes, the probability "
    "with a given record is at most e^ε times the probability without it, plus δ. It is stated "
    "per site, for that site's whole run (all rounds composed). It is not the probability that a "
    "record leaks, nor a rate per round or per record. A mechanism that published one record "
    "in full, picked at random, would satisfy δ = 1/records; so δ must be far below 1/records."
)

# (who, what holds) — the threat model, in the order a compliance officer asks.
THREAT_MODEL: tuple[tuple[str, str], ...] = (
    ("An honest-but-curious coordinator (runs the protocol, reads what it receives)",
     "With SecAgg+ on, it learns the sum of the sampled sites' updates, not one site's, as long "
     "as fewer sites than the SecAgg+ threshold collude with it. Without SecAgg+ it sees each "
     "site's update, protected only by that site's differential privacy. Either way it sees, "
     "per site and in clear, the values listed under \"What left each site\"."),
    ("A malicious coordinator (chooses the run config, the global adapter, the SecAgg+ "
     "parameters)",
     "SecAgg+ no longer protects: Flower's SecAgg+ client accepts whatever threshold and list of "
     "dropped sites the server sends (fedtune's own server uses max(2, ⌊2n/3⌋) of n sites), so "
     "a coordinator that lies can unmask single updates unless the site's policy refuses a "
     "threshold below its floor. What still holds is each site's own sample-level (ε, δ): the "
     "clipping bound, the noise, the budget and the policy floor come from the site's "
     "site.toml, and the batches and noise are drawn from the site's own OS entropy, so no "
     "choice of global adapter or run config weakens it."),
    ("Other sites",
     "They receive only the global adapters, which are computed from the sites' DP updates: "
     "each site's (ε, δ) covers them. Sites that collude with the coordinator count towards "
     "the SecAgg+ threshold."),
    ("Not covered",
     "Hyper-parameters chosen by trying them on a site's data (step sizes, batch size, rounds) "
     "unless chosen on public data or by rule; the number of records at each site; the values "
     "sent in clear (listed below); timing side channels (when a site replies, how long its "
     "round takes); PyTorch's non-cryptographic random number generator when Opacus' secure "
     "mode is off, and floating-point attacks on Gaussian sampling; whether a whole site took "
     "part (only with site-level DP). A run with a fixed, known seed gives no guarantee "
     "against whoever knows the seed."),
)

NEVER_DATA = (
    "What left each site, per round, is one model update (the LoRA adapter difference, or an "
    "all-zero update when the site declined) and the values in the table below, which is the "
    "list the sites' code filters their replies through (anything not in it is never sent). "
    "Only the update is protected by the DP guarantee; the other values are sent in clear. "
    "Records, per-example gradients and the site's data never leave the site. The size and "
    "SHA-256 fingerprint of each update were written into the site's ledger (and fsync'ed) "
    "before it was sent; the site does not send them. Without SecAgg+ the server hashes each "
    "update it receives, and the last column says whether that hash equals the ledger's."
)


AUDIT_MEANING = (
    "This is a lower bound: the attack could not show more leakage than this; it does not prove "
    "the guarantee. An audited bound above the accountant's ε would show an implementation bug."
)
AUDIT_METHOD = (
    "One-run audit (Steinke, Nasr & Jagielski, NeurIPS 2023): canaries each included with "
    "probability 1/2 at the auditor site (site-0), scored after the run; the top and bottom "
    "scores are guessed in and out, and the right guesses give ε's lower bound."
)
