"""The run-level report of a coordinator's run directory: what the sites *reported*, per round.

A coordinator holds no site ledger: what it knows of each site's privacy is what the site sent
with its update (metrics.jsonl `sites[]`: ε, δ, σ, status, reason; q and steps where a site sends
them). This report lays that out per round, with which sites took part, which declined, refused
or dropped out, and the server's own checks of the aggregate (validation, norms, held-out
metrics). Everything about privacy in it is labelled as reported: the sites' ledgers stay the
source of truth, and `fedtune report <ledger>` at each site gives the ledger-based report.
"""

from __future__ import annotations

import json
import time
from html import escape
from pathlib import Path
from typing import Any

import tomllib

from fedtune.common import disclosure
from fedtune.common.round_record import dropped_sites
from fedtune.common.run_layout import RunLayout
from fedtune.report.data import REPORT_VERSION, _central, read_metrics
from fedtune.report.render_html import CSS, _f, _table

LEDGER_FILE = "privacy_ledger.sqlite"  # common/ledger.py's PrivacyLedger.FILENAME
STATUS_FILE = "status.json"  # written by the coordinator (server/status_file.py)
# Per-site values a site may report about its privacy spend, in the order shown.
PRIVACY_KEYS = ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant")
REPORTED_NOTE = (
    "Every privacy figure in this report is what a site REPORTED to the coordinator with its "
    "update (metrics.jsonl). The coordinator cannot check it: each site's privacy ledger, kept at "
    "the site, is the source of truth; `fedtune report <ledger>` at each site gives the report "
    "built from it."
)


def is_run_level(source: Path) -> bool:
    """A run directory with metrics.jsonl and no site ledger under it (a coordinator's)."""
    source = Path(source)
    return (source.is_dir() and RunLayout(source).metrics.is_file()
            and next(source.rglob(LEDGER_FILE), None) is None)


def _order(site_id: str) -> tuple[int, str]:
    return len(site_id), site_id


def _config(run_dir: Path) -> dict[str, Any]:
    try:
        cfg = tomllib.loads(RunLayout(run_dir).config.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    fed, dp = cfg.get("federation", {}), cfg.get("dp", {})
    return {"model": cfg.get("model", {}).get("name"), "strategy": fed.get("strategy"),
            "rounds": fed.get("rounds"), "num_sites": fed.get("num_sites"),
            "min_fit_sites": fed.get("min_fit_sites"), "secagg": fed.get("secagg"),
            "max_update_norm": fed.get("max_update_norm"), "dp_enabled": dp.get("enabled"),
            "target_epsilon": dp.get("target_epsilon"), "delta": dp.get("delta")}


def _expected(run_dir: Path) -> list[str]:
    """The sites the coordinator expected (its registered keys, from status.json), if known."""
    try:
        data = json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    return list(data.get("expected_sites") or []) if isinstance(data, dict) else []


def round_entry(rec: dict, expected: list[str]) -> dict[str, Any]:
    """One round of metrics.jsonl as the report shows it."""
    sites = sorted(rec.get("sites") or [], key=lambda s: _order(str(s.get("site_id"))))
    by_status: dict[str, list[dict]] = {}
    reported = []
    for s in sites:
        sid, status = str(s.get("site_id", "?")), s.get("status") or "ok"
        by_status.setdefault(status, []).append({"site_id": sid, "reason": s.get("reason")})
        reported.append({"site_id": sid, "status": status, "reason": s.get("reason"),
                         "records": s.get("records"),
                         **{k: s[k] for k in PRIVACY_KEYS if s.get(k) is not None}})
    dropped = dropped_sites(rec)
    named = {s["site_id"] for s in reported} | {d["site_id"] for d in dropped}
    agg = rec.get("aggregation") or {}
    rnd = int(rec.get("round", 0))
    return {
        "round": rnd,
        "took_part": [x["site_id"] for x in by_status.get("ok", [])],
        "did_not_train": {k: v for k, v in by_status.items() if k != "ok"},
        "dropped": dropped,
        # Expected sites the round's record does not name at all (no reply, or not sampled).
        "no_reply": ([sid for sid in expected if sid not in named] if rnd > 0 else []),
        "reported": reported,
        "checks": {
            "aggregated": "checkpoint_seconds" in rec if rnd > 0 else None,
            "updates_received": agg.get("sites"),
            "upload_bytes": agg.get("upload_bytes"),
            "rejected": agg.get("rejected") or [],
            "adapter_norm": rec.get("adapter_norm"),
            "divergence": rec.get("divergence"),
            "central_dp": rec.get("central_dp"),
        },
        "eval": rec.get("eval"),
        "round_seconds": rec.get("round_seconds"),
    }


def _site_summary(rounds: list[dict]) -> list[dict]:
    """Per site: rounds it trained, its statuses, and the last privacy figures it reported."""
    out: dict[str, dict] = {}
    for r in rounds:
        for s in r["reported"]:
            d = out.setdefault(s["site_id"], {"site_id": s["site_id"], "rounds_trained": 0,
                                              "statuses": {}, "last_reported": None,
                                              "last_reported_round": None})
            d["rounds_trained"] += s["status"] == "ok"
            d["statuses"][s["status"]] = d["statuses"].get(s["status"], 0) + 1
            if "epsilon" in s:
                d["last_reported"] = {k: s[k] for k in PRIVACY_KEYS if k in s}
                d["last_reported_round"] = r["round"]
    return [out[k] for k in sorted(out, key=_order)]


def _warnings(rounds: list[dict]) -> list[dict]:
    out = [{"site": None, "message": REPORTED_NOTE}]
    for r in rounds:
        for status, sites in r["did_not_train"].items():
            for s in sites:
                out.append({"site": s["site_id"], "message": (
                    f"round {r['round']}: {s['site_id']} {status}"
                    + (f" ({s['reason']})" if s["reason"] else ""))})
        for d in r["dropped"]:
            out.append({"site": d["site_id"], "message": (
                f"round {r['round']}: {d['site_id']} dropped out"
                + (f" ({d['reason']})" if d["reason"] else ""))})
        if r["no_reply"]:
            out.append({"site": None, "message": (
                f"round {r['round']}: no reply recorded from {', '.join(r['no_reply'])}")})
        for x in r["checks"]["rejected"]:
            out.append({"site": x.get("site_id"), "message": (
                f"round {r['round']}: the server rejected the update of {x.get('site_id')}: "
                f"{x.get('reason')}")})
        if r["checks"]["divergence"]:
            out.append({"site": None, "message": f"round {r['round']}: held-out loss diverged"})
    return out


def build_run_report(run_dir: str | Path) -> dict[str, Any]:
    """The run-level report of a coordinator's run directory, JSON-ready."""
    run_dir = Path(run_dir)
    metrics = sorted(read_metrics(run_dir), key=lambda m: m.get("round", 0))
    if not metrics:
        raise FileNotFoundError(f"{run_dir}: metrics.jsonl holds no round yet")
    expected = _expected(run_dir)
    rounds = [round_entry(m, expected) for m in metrics]
    return {
        "report_version": REPORT_VERSION,
        "kind": "run_level",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": str(run_dir),
        "run_id": metrics[0].get("run_id") or run_dir.name,
        "rounds_completed": max(m["round"] for m in metrics),
        "config": _config(run_dir),
        "expected_sites": expected,
        "privacy_figures": "reported by the sites (not from their ledgers)",
        "reported_note": REPORTED_NOTE,
        "reported_sites": _site_summary(rounds),
        "rounds": rounds,
        # The ledger-based report's per-site section: empty here (no ledger at the coordinator).
        "sites": [],
        "central_dp": _central(metrics),  # computed by the server itself, not reported
        "disclosure": disclosure.as_rows(),
        "warnings": _warnings(rounds),
        "audit": None,
    }


# ---------------------------------------------------------------------------------------------
# Rendering.


def _names(items: list[dict] | list[str]) -> str:
    return ", ".join(x if isinstance(x, str) else (
        x["site_id"] + (f" ({x['reason']})" if x.get("reason") else "")) for x in items) or "–"


def _not_trained(r: dict) -> str:
    parts = [f"{status}: {_names(sites)}" for status, sites in r["did_not_train"].items()]
    parts += [f"dropped: {_names(r['dropped'])}"] if r["dropped"] else []
    parts += [f"no reply: {_names(r['no_reply'])}"] if r["no_reply"] else []
    return "; ".join(parts) or "–"


def _aggregate(r: dict) -> str:
    c = r["checks"]
    if c["aggregated"] is None:
        return "initial adapter"
    if not c["aggregated"]:
        return "no aggregate (adapter unchanged)"
    text = f"yes, {c['updates_received']} update(s)" if c["updates_received"] else "yes"
    if c["rejected"]:
        text += "; rejected: " + ", ".join(f"{x.get('site_id')} ({x.get('reason')})"
                                           for x in c["rejected"])
    return text


def _eval(r: dict) -> str:
    ev = r.get("eval") or {}
    return ", ".join(f"{k} = {v:.4g}" for k, v in ev.items() if isinstance(v, (int, float))) \
        or "–"


def _privacy_columns(report: dict) -> list[str]:
    """PRIVACY_KEYS that some site reported (q and steps only where a site sends them)."""
    seen = {k for r in report["rounds"] for s in r["reported"] for k in PRIVACY_KEYS if k in s}
    return [k for k in PRIVACY_KEYS if k in seen]


HEADERS = {"epsilon": "ε reported", "delta": "δ reported", "noise_multiplier": "σ reported",
           "sample_rate": "q reported", "steps": "steps reported", "accountant": "accountant"}


def _round_rows(report: dict) -> list[list[str]]:
    return [[str(r["round"]), _names(r["took_part"]) if r["round"] else "(initial evaluation)",
             _not_trained(r), _aggregate(r), _f(r["checks"]["adapter_norm"]), _eval(r)]
            for r in report["rounds"]]


def _reported_rows(report: dict, cols: list[str]) -> list[list[Any]]:
    return [[r["round"], s["site_id"], s["status"] + (f": {s['reason']}" if s["reason"] else ""),
             *[s.get(k) for k in cols]]
            for r in report["rounds"] for s in r["reported"]]


def render_run_html(report: dict) -> str:
    """The run-level report as one self-contained HTML page (report/render_html.py's style)."""
    cols = _privacy_columns(report)
    rounds = _table(["round", "sites that took part", "declined / refused / dropped",
                     "aggregate (server checks)", "adapter norm", "held-out metrics"],
                    [[escape(c) if i != 4 else c for i, c in enumerate(row)]
                     for row in _round_rows(report)], left=4)
    reported = _table(["round", "site", "status (reported)", *[HEADERS[k] for k in cols]],
                      [[_f(c) for c in row] for row in _reported_rows(report, cols)], left=3)
    summary = _table(
        ["site", "rounds trained", "statuses (reported)", "last round reported",
         *[HEADERS[k] for k in cols]],
        [[escape(s["site_id"]), str(s["rounds_trained"]),
          escape(", ".join(f"{k} × {v}" for k, v in s["statuses"].items())),
          _f(s["last_reported_round"]),
          *[_f((s["last_reported"] or {}).get(k)) for k in cols]]
         for s in report["reported_sites"]], left=3)
    warnings = "".join(f'<div class="warn">⚠ {escape(w["message"])}</div>'
                       for w in report["warnings"][1:]) or "<p>None.</p>"
    cfg = report.get("config") or {}
    setup = ", ".join(f"{k} = {v}" for k, v in cfg.items() if v is not None)
    expected = (f"<p>Sites expected (keys registered at the coordinator): "
                f"{escape(', '.join(report['expected_sites']))}.</p>"
                if report["expected_sites"] else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>fedtune run report — {escape(str(report['run_id']))}</title>
<style>{CSS}</style></head><body>
<h1>Run report — run {escape(str(report['run_id']))} (as reported by the sites)</h1>
<p class="meta">Generated {escape(report['generated_at'])} by <code>fedtune report</code> from
the coordinator's run directory <code>{escape(report['source'])}</code>;
{report['rounds_completed']} round(s) recorded. Configuration: {escape(setup) or '–'}.</p>
<div class="warn"><b>Reported, not verified.</b> {escape(REPORTED_NOTE)}</div>
{expected}
<h2>Rounds</h2>
{rounds}
<h2>Privacy spend per round, as each site reported it</h2>
{reported}
<h2>Sites: last reported figures</h2>
{summary}
<h2>Warnings</h2>{warnings}
</body></html>
"""


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(x: Any) -> str:
        text = "–" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_run_markdown(report: dict) -> str:
    """The run-level report as markdown (the same tables as the HTML page)."""
    cols = _privacy_columns(report)
    parts = [
        f"# Run report — run {report['run_id']} (as reported by the sites)", "",
        f"Generated {report['generated_at']} from `{report['source']}`; "
        f"{report['rounds_completed']} round(s) recorded.", "",
        f"> **Reported, not verified.** {REPORTED_NOTE}", "",
    ]
    if report["expected_sites"]:
        parts += [f"Sites expected: {', '.join(report['expected_sites'])}.", ""]
    parts += ["## Rounds", "", _md_table(
        ["round", "sites that took part", "declined / refused / dropped",
         "aggregate (server checks)", "adapter norm", "held-out metrics"],
        _round_rows(report)), ""]
    parts += ["## Privacy spend per round, as each site reported it", "", _md_table(
        ["round", "site", "status (reported)", *[HEADERS[k] for k in cols]],
        _reported_rows(report, cols)), ""]
    parts += ["## Sites: last reported figures", "", _md_table(
        ["site", "rounds trained", "statuses (reported)", "last round reported",
         *[HEADERS[k] for k in cols]],
        [[s["site_id"], s["rounds_trained"],
          ", ".join(f"{k} × {v}" for k, v in s["statuses"].items()), s["last_reported_round"],
          *[(s["last_reported"] or {}).get(k) for k in cols]]
         for s in report["reported_sites"]]), ""]
    warnings = [w["message"] for w in report["warnings"][1:]]
    parts += ["## Warnings", ""] + ([f"- {w}" for w in warnings] or ["None."]) + [""]
    return "\n".join(parts)
