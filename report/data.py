"""Collect a privacy report from a run directory or a site's ledger file: plain dicts, JSON-ready.

Every epsilon in the report is read from the site ledgers as written (rows from before the PRV
column was added are recomputed from their mechanism parameters and marked so); nothing is
re-estimated. The run's `metrics.jsonl` adds the server's view: which sites replied with what
status, the hash of each reply as the server received it (computed by the server; without
SecAgg+), which values each site sent, and the site-level (central DP) accountant. What may leave
a site at all is the list in common/disclosure.py, printed as is.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from fedtune.common import disclosure
from fedtune.common.ledger import LedgerRow, PrivacyLedger
from fedtune.common.privacy import epsilons, group_privacy
from fedtune.common.round_record import read_rounds
from fedtune.common.run_layout import RunLayout
from fedtune.report.wording import AUDIT_MEANING

REPORT_VERSION = 1
NEARLY_USED = 0.8  # warn when a site has used this share of its budget
DELTA_RULE = 0.1  # warn when delta x records exceeds this (delta should be << 1 / records)
WEAK_EPSILON = 10.0  # warn above this epsilon


def find_ledgers(source: Path) -> list[Path]:
    """Ledger files of a run directory (one per site), or the file itself."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such run directory or ledger file")
    found = sorted(source.rglob(PrivacyLedger.FILENAME))
    if not found:
        raise FileNotFoundError(f"no {PrivacyLedger.FILENAME} under {source}")
    return found


def read_metrics(run_dir: Path | None) -> list[dict]:
    """The round records of a run directory's metrics.jsonl ([] without a run directory)."""
    return read_rounds(run_dir) if run_dir else []


def retried_rounds(round_numbers: list[int]) -> list[dict]:
    """[{round, retries}] of the rounds a run's ledger holds more than once: a retried round
    (a coordinator restart, a resumed run) is a second spend, and the ledger counts both."""
    counts: dict[int, int] = {}
    for r in round_numbers:
        counts[r] = counts.get(r, 0) + 1
    return [{"round": r, "retries": n - 1} for r, n in sorted(counts.items()) if n > 1]


def _round_dict(row: LedgerRow, run_history: list, site_history: list) -> dict:
    d = asdict(row)
    if row.epsilon_run_prv is None or row.epsilon_run_rdp is None:  # pre-PRV ledger rows
        run, total = epsilons(run_history, row.delta), epsilons(site_history, row.delta)
        d.update(epsilon_run_rdp=run["rdp"], epsilon_run_prv=run["prv"],
                 epsilon_total_rdp=total["rdp"], epsilon_total_prv=total["prv"],
                 recomputed=True)
    return d


def _site_report(ledger: PrivacyLedger, site_id: str, focus_run: str | None,
                 server_rounds: dict[tuple[str, int], dict],
                 received: dict[tuple[str, int], str]) -> dict:
    site = PrivacyLedger.from_file(ledger.path, site_id)
    rows, plans = site.rows(), {r: p for r, _, p in site.plans()}
    payloads, declines = site.payloads(), site.declines()
    runs = []
    site_history: list = []
    for run_id in site.run_ids():
        run_rows, run_history = [], []
        for row in (r for r in rows if r.run_id == run_id):
            run_history.append(row.mechanism)
            site_history.append(row.mechanism)
            run_rows.append(_round_dict(row, list(run_history), list(site_history)))
        run_payloads = [asdict(p) for p in payloads if p.run_id == run_id]
        for p in run_payloads:
            seen = received.get((site_id, p["round"]))  # None under SecAgg+
            if seen is not None and run_id == focus_run:
                p["server_received_sha256"] = seen
                p["matches_server"] = seen == p["sha256"]
        plan = plans.get(run_id)
        last = run_rows[-1] if run_rows else None
        runs.append({
            "run_id": run_id,
            "plan": asdict(plan) if plan else None,
            "rounds": run_rows,
            "rounds_trained": len(run_rows),  # every attempt: a retried round counts again
            "retried": retried_rounds([r["round"] for r in run_rows]),
            "payloads": run_payloads,
            "declines": [asdict(d) for d in declines if d.run_id == run_id],
            "epsilon_rdp": last["epsilon_run_rdp"] if last else 0.0,
            "epsilon_prv": last["epsilon_run_prv"] if last else 0.0,
            "accounted_without_payload": sorted(
                {r["round"] for r in run_rows} - {p["round"] for p in run_payloads}
            ),
            # Rounds whose batches and noise came from the run's seed (dp.reproducible_seed),
            # and rounds from before the ledger recorded it: not secret from whoever has the seed.
            "seeded_rounds": sorted({r["round"] for r in run_rows
                                     if r["secret_randomness"] is False}),
            "randomness_unknown_rounds": sorted({r["round"] for r in run_rows
                                                 if r["secret_randomness"] is None}),
            # Updates trained without DP (dp.enabled = false): no guarantee at all for them.
            "sent_without_dp": sorted(
                {p["round"] for p in run_payloads if p["status"] == "ok"}
                - {r["round"] for r in run_rows}
            ),
        })
    if rows:  # the site's total is what its latest ledger row says
        latest = rows[-1]
        total = {"rdp": latest.epsilon_total_rdp, "prv": latest.epsilon_total_prv}
        if None in total.values():  # pre-PRV ledger row
            total = epsilons([r.mechanism for r in rows], latest.delta)
    else:
        total = {"rdp": 0.0, "prv": 0.0}
    focus = next((r for r in runs if r["run_id"] == focus_run), runs[-1] if runs else None)
    plan = (focus or {}).get("plan") or {}
    records = plan.get("records") or (rows[-1].records if rows else None)
    if records is None:  # no DP round: what the site told the server
        told = [v.get("records") for (sid, _), v in server_rounds.items() if sid == site_id]
        records = next((int(r) for r in told if r is not None), None)
    budget = plan.get("max_epsilon")
    accountant = plan.get("accountant") or (rows[-1].accountant if rows else "rdp")
    focus_rows = (focus or {}).get("rounds") or []
    unit = plan.get("privacy_unit") or (focus_rows[-1]["privacy_unit"] if focus_rows
                                        else "record")
    eps_run = (focus or {}).get(f"epsilon_{accountant}") or 0.0
    delta = plan.get("delta") or (rows[-1].delta if rows else None)
    return {
        "site_id": site_id,
        "ledger": str(ledger.path),
        "records": records,
        "delta": plan.get("delta") or (rows[-1].delta if rows else None),
        "accountant": accountant,
        "budget_max_epsilon": budget,
        "epsilon_total": total,
        "budget_used": (total[accountant] / budget) if budget else None,
        "runs": runs,
        "focus_run": focus["run_id"] if focus else None,
        # The unit of privacy of the focus run: "record" or the person column.
        "privacy_unit": unit,
        "person_column": plan.get("person_column"),
        "persons": plan.get("persons"),
        "max_person_records": plan.get("max_person_records"),
        "group_bound": _group_bound(unit, plan, eps_run, delta),
        # The values the server logged from this site in this run (a subset of the list)
        "values_received": sorted({k for (sid, _), v in server_rounds.items() if sid == site_id
                                   for k in v}),
    }


def _group_bound(unit: str, plan: dict, eps: float, delta: float | None) -> dict | None:
    """A record-level run on data with a person column: what its (ε, δ) per record gives the
    site's largest person (k records), by group privacy: (kε, k·e^((k-1)ε)·δ)."""
    k = plan.get("max_person_records")
    if unit != "record" or not k or delta is None or not plan.get("person_column"):
        return None
    g_eps, g_delta = group_privacy(eps, delta, int(k))
    return {"column": plan["person_column"], "k": int(k), "epsilon": eps, "delta": delta,
            "group_epsilon": g_eps, "group_delta": g_delta}


def _warnings(sites: list[dict], central: dict | None) -> list[dict]:
    out = []
    for s in sites:
        sid, used = s["site_id"], s["budget_used"]
        if used is not None and used >= NEARLY_USED:
            out.append({"site": sid, "message": (
                f"{sid} has used {used:.0%} of its privacy budget "
                f"(ε = {s['epsilon_total'][s['accountant']]:.3g} of {s['budget_max_epsilon']:g})"
            )})
        eps = s["epsilon_total"][s["accountant"]]
        if eps > WEAK_EPSILON:
            out.append({"site": sid, "message": (
                f"{sid}'s ε = {eps:.3g} is large: a guarantee this weak protects little"
            )})
        for run in s["runs"]:
            if run["sent_without_dp"]:
                out.append({"site": sid, "message": (
                    f"{sid} sent model updates trained WITHOUT differential privacy in run "
                    f"{run['run_id']} (rounds {run['sent_without_dp']}): no guarantee covers them"
                )})
        if s["budget_max_epsilon"] is None and any(r["rounds"] for r in s["runs"]):
            out.append({"site": sid, "message": (
                f"{sid} has no lifetime budget (site.toml [privacy] max_epsilon; in a "
                "simulation dp.max_epsilon): every new run adds to its ε"
            )})
        person_level = s["privacy_unit"] != "record" and s["persons"]
        count, noun = (s["persons"], "persons") if person_level else (s["records"], "records")
        if s["delta"] and count and s["delta"] * count > DELTA_RULE:
            out.append({"site": sid, "message": (
                f"δ = {s['delta']:g} is large for {sid}'s {count} {noun} "
                f"(δ × {noun} = {s['delta'] * count:.2g}); δ should be far below "
                f"1/{noun} = {1 / count:.2g}, e.g. ≤ {0.1 / count:.1g}"
            )})
        if s["group_bound"] and s["group_bound"]["k"] > 1:
            g = s["group_bound"]
            out.append({"site": sid, "message": (
                f"{sid}'s guarantee is per record, but its data has several records per person "
                f"(column {g['column']}): its largest person ({g['k']} records) is protected "
                f"only at ε = {g['group_epsilon']:.3g}, δ = {g['group_delta']:.3g} (group "
                "privacy). Set data.privacy_unit to the person column for a per-person guarantee"
            )})
        for run in s["runs"]:
            if run["seeded_rounds"]:
                out.append({"site": sid, "message": (
                    f"{sid} drew its Poisson batches and noise from the run's seed "
                    f"(dp.reproducible_seed) in run {run['run_id']} (rounds "
                    f"{run['seeded_rounds']}): its guarantee does not hold against whoever "
                    "knows the seed, the coordinator included"
                )})
            if run["randomness_unknown_rounds"]:
                out.append({"site": sid, "message": (
                    f"{sid}'s ledger does not say whether its batches and noise were secret in "
                    f"run {run['run_id']} (rounds {run['randomness_unknown_rounds']}, recorded "
                    "by an older fedtune, which seeded them from the run's seed): treat its "
                    "guarantee as not holding against whoever knows that seed"
                )})
            for d in run["declines"][:1]:
                out.append({"site": sid, "message": (
                    f"{sid} declined from round {d['round']} of run {run['run_id']}: {d['reason']}"
                )})
            if run["accounted_without_payload"]:
                out.append({"site": sid, "message": (
                    f"{sid}: round(s) {run['accounted_without_payload']} of run {run['run_id']} "
                    "were accounted but no update left the site (it stopped mid-round); "
                    "they are counted anyway, so the ledger over-counts, never under-counts"
                )})
            if any(p.get("matches_server") is False for p in run["payloads"]):
                out.append({"site": sid, "message": (
                    f"{sid}: a payload hash recorded at the site differs from the one the "
                    "server logged for the same round"
                )})
    if central and central["rounds"]:
        if central["epsilon_rdp"] > WEAK_EPSILON:
            out.append({"site": None, "message": (
                f"site-level ε = {central['epsilon_rdp']:.3g} is large: a guarantee this weak "
                "protects little (raise central_dp.noise_multiplier)"
            )})
        n, d = central["sites_sampled"], central["delta"]
        if d * n > DELTA_RULE:
            out.append({"site": None, "message": (
                f"site-level δ = {d:g} is large for {n} sites (δ × sites = {d * n:.2g})"
            )})
    return out


def _central(metrics: list[dict]) -> dict | None:
    rounds = [m["central_dp"] for m in metrics if m.get("central_dp")]
    if not rounds:
        return None
    last = rounds[-1]
    keep = ("side", "clipping", "noise_multiplier", "sites_sampled", "delta")
    return {**{k: last[k] for k in keep}, "rounds": rounds,
            "epsilon_rdp": last["epsilon_rdp"], "epsilon_prv": last["epsilon_prv"]}


def _audit(run_dir: Path | None) -> dict | None:
    """`fedtune audit`'s result (RUN_DIR/audit.json, simulations/audit.py), if any."""
    path = RunLayout(run_dir).audit if run_dir else None
    if path is None or not path.is_file():
        return None
    audit = json.loads(path.read_text(encoding="utf-8"))
    keep = ("mode", "m", "confidence", "delta", "accountant", "accountant_epsilon",
            "lower_bound", "guesses", "correct", "audited", "passed", "tightness")
    return {**{k: audit.get(k) for k in keep}, "meaning": AUDIT_MEANING}


def build_report(source: str | Path) -> dict:
    """The report of a run directory (all its sites) or of one ledger file (all its runs)."""
    source = Path(source)
    ledgers = find_ledgers(source)
    run_dir = source if source.is_dir() else None
    metrics = read_metrics(run_dir)
    focus_run = metrics[0]["run_id"] if metrics else (run_dir.name if run_dir else None)
    server_rounds = {
        (s.get("site_id"), m["round"]): s for m in metrics for s in m.get("sites", [])
    }
    received = {
        (sid, m["round"]): sha for m in metrics
        for sid, sha in (m.get("aggregation") or {}).get("received_sha256", {}).items()
    }
    sites = []
    for path in ledgers:
        ledger = PrivacyLedger.from_file(path)
        for site_id in ledger.site_ids():
            sites.append(_site_report(ledger, site_id, focus_run, server_rounds, received))
    sites.sort(key=lambda s: (len(s["site_id"]), s["site_id"]))
    if focus_run is None and sites:
        focus_run = sites[0]["focus_run"]
    central = _central(metrics)
    audit = _audit(run_dir)
    declined_by_server = [
        {"round": m["round"], "site_id": s.get("site_id"), "status": s.get("status")}
        for m in metrics for s in m.get("sites", []) if s.get("status") not in (None, "ok")
    ]
    return {
        "report_version": REPORT_VERSION,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": str(source),
        "run_id": focus_run,
        "rounds_completed": max((m["round"] for m in metrics), default=None),
        "sites": sites,
        "central_dp": central,
        "server_saw_declines": declined_by_server,
        "disclosure": disclosure.as_rows(),  # what may leave each site (common/disclosure.py)
        "warnings": _warnings(sites, central) + ([{"site": "site-0", "message": (
            f"the privacy audit's lower bound ε ≥ {audit['lower_bound']:.3g} exceeds the "
            f"accountant's ε = {audit['accountant_epsilon']:.3g}: a DP implementation bug")}]
            if audit and not audit["passed"] else []),
        "audit": audit,
    }
