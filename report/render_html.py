"""Render a report dict as one self-contained HTML page (inline CSS, plot as a base64 PNG)."""

from __future__ import annotations

import base64
from html import escape

from fedtune.report import wording
from fedtune.report.plot import epsilon_plot

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;color:#1d2733;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.1em}h2{font-size:1.2em;margin-top:1.8em;
border-bottom:2px solid #dde3ea;padding-bottom:.2em}h3{font-size:1.02em;margin-bottom:.3em}
.meta{color:#5b6b7c;font-size:.9em}
.guarantee{background:#eef6ee;border-left:5px solid #3c8d40;padding:.6em 1em;margin:.6em 0}
.site-level{background:#eef2fb;border-left:5px solid #3d5fa8}
.nodp{background:#fdecea;border-left-color:#b3261e}
.warn{background:#fff6e0;border-left:5px solid #d49a00;padding:.5em 1em;margin:.4em 0}
.ok{color:#2e7d32;font-weight:600}.bad{color:#b3261e;font-weight:600}
table{border-collapse:collapse;width:100%;font-size:.86em;margin:.5em 0}
th,td{border:1px solid #d5dce4;padding:.3em .5em;text-align:right}
th{background:#f1f4f8}td.l,th.l{text-align:left;white-space:nowrap}
code,.hash{font-family:Menlo,Consolas,monospace;font-size:.9em}
.hash{word-break:break-all}img{max-width:100%;border:1px solid #e3e8ee}
@media print{h2,h3{break-after:avoid}img,tr,.guarantee,.warn{break-inside:avoid}}
"""


def _f(x: object, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return escape(str(x))


def _table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{escape(h)}</th>'
                   for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>'
                         for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _focus(site: dict) -> dict | None:
    return next((r for r in site["runs"] if r["run_id"] == site["focus_run"]), None)


def _status(run: dict | None) -> str:
    if run is None:
        return "–"
    if run.get("sent_without_dp"):
        return '<span class="bad">trained without DP</span>'
    if run["declines"]:
        d = run["declines"][0]
        word = "refused" if d["reason"].startswith("refused") else "budget exhausted"
        return f'<span class="bad">{word} at round {d["round"]}</span>'
    return '<span class="ok">trained every round it was asked</span>'


def _group_cell(site: dict) -> str:
    """A record-level site with a person column: k records of its largest person, and the
    group-privacy (ε, δ) that gives it; "–" otherwise."""
    g = site.get("group_bound")
    if not g:
        return "–"
    return escape(f"k = {g['k']}: ε = {g['group_epsilon']:.3g}, δ = {g['group_delta']:.3g}")


def _sites_table(report: dict) -> str:
    rows = []
    for s in report["sites"]:
        run = _focus(s)
        plan = (run or {}).get("plan") or {}
        acc = s["accountant"]
        rows.append([
            escape(s["site_id"]), escape(wording.unit_label(s)), _f(s["records"]),
            _f(s.get("persons")), _group_cell(s), _f(s["delta"]), escape(acc.upper()),
            _f(plan.get("noise_multiplier")), _f(plan.get("sample_rate")),
            _f(plan.get("max_grad_norm")), _f(plan.get("steps_per_round")),
            _f(plan.get("rounds")), escape(wording.rounds_label(run)),
            _f(run["epsilon_rdp"] if run else None), _f(run["epsilon_prv"] if run else None),
            _f(s["epsilon_total"][acc]),
            _f(s["budget_max_epsilon"]) if s["budget_max_epsilon"] else "none",
            f"{s['budget_used']:.0%}" if s["budget_used"] is not None else "–",
            _status(run),
        ])
    return _table(
        ["site", "privacy unit", "records", "persons", "largest person: group ε, δ", "δ",
         "accountant", "σ (noise mult.)", "q (sample rate)",
         "C (clip norm)", "steps / round", "rounds planned", "rounds trained",
         "ε this run (RDP)", "ε this run (PRV)", "ε all runs", "budget ε", "budget used",
         "status"],
        rows,
    )


def _site_rounds(site: dict) -> str:
    run = _focus(site)
    if run is None:
        return ""
    # One line per attempt: a retried round is in the ledger twice (both spends count).
    by_round: dict[tuple[int, int], dict] = {}
    for kind, items in (("row", run["rounds"]), ("payload", run["payloads"]),
                        ("decline", run["declines"])):
        attempts: dict[int, int] = {}
        for x in items:
            n = attempts[x["round"]] = attempts.get(x["round"], 0) + 1
            by_round.setdefault((x["round"], n), {})[kind] = x
    rows = []
    for rnd, attempt in sorted(by_round):
        e = by_round[(rnd, attempt)]
        row, pay = e.get("row"), e.get("payload")
        status = pay["status"] if pay else ("declined" if "decline" in e else
                                            "accounted, nothing sent")
        match = pay.get("matches_server") if pay else None
        rows.append([
            str(rnd) + (f" (retry {attempt - 1})" if attempt > 1 else ""), escape(status),
            _f(row["steps"] if row else None),
            _f(row["epsilon_run_rdp"] if row else None),
            _f(row["epsilon_run_prv"] if row else None),
            _f(row["epsilon_total_rdp"] if row else None),
            _f(pay["bytes"] if pay else None),
            f'<span class="hash">{escape(pay["sha256"])}</span>' if pay else "–",
            "–" if match is None else ('<span class="ok">yes</span>' if match else
                                       '<span class="bad">NO</span>'),
        ])
    return (
        f"<h3>{escape(site['site_id'])} — ledger <code>{escape(site['ledger'])}</code></h3>"
        + _table(["round", "status", "DP steps", "ε run (RDP)", "ε run (PRV)",
                  "ε all runs (RDP)", "bytes sent", "SHA-256 of the update",
                  "same hash in server log"], rows, left=2)
    )


def _disclosure_table(report: dict) -> str:
    """The list of values that may leave a site (common/disclosure.py), as the report holds it."""
    rows = [[f"<code>{escape(d['key'])}</code>", escape(d["what"]), escape(d["why"]),
             escape(d["when"])] for d in report.get("disclosure", [])]
    received = "".join(
        f"<li>{escape(s['site_id'])}: "
        + (", ".join(f"<code>{escape(k)}</code>" for k in s.get("values_received", []))
           or "nothing logged") + "</li>"
        for s in report["sites"])
    return (_table(["value", "what", "why the coordinator needs it", "when sent"], rows, left=4)
            + "<p>Values the server logged from each site in this run:</p>"
            + f"<ul>{received}</ul>")


def _threat_model() -> str:
    items = "".join(f"<li><b>{escape(who)}.</b> {escape(text)}</li>"
                    for who, text in wording.THREAT_MODEL)
    return f"<h2>Threat model</h2><ul>{items}</ul><p>{escape(wording.DELTA_MEANING)}</p>"


def _central_section(central: dict | None) -> str:
    if not central:
        return ""
    rows = [[str(r["round"]), _f(r["clipping_norm"]), _f(r["noise_multiplier"]),
             _f(r["noise_multiplier_effective"]), f"{r['sites_aggregated']}/{r['sites_sampled']}",
             _f(r["epsilon_rdp"]), _f(r["epsilon_prv"])] for r in central["rounds"]]
    return (
        "<h2>Site-level (central) differential privacy</h2>"
        f"<p>Flower's <code>DifferentialPrivacy{central['side'].title()}Side"
        f"{central['clipping'].title()}Clipping</code> wrapper: each site's update is clipped to "
        "L2 norm C and the equal-weight mean gets Gaussian noise of std z·C / sites sampled. "
        "The server-side accountant treats every released global adapter as a Gaussian "
        "mechanism with noise multiplier z·(sites aggregated / sites sampled), composed over "
        "rounds without sampling amplification.</p>"
        + _table(["round", "clip norm C", "z", "effective z", "sites aggregated / sampled",
                  "ε (RDP)", "ε (PRV)"], rows)
    )


def _audit_section(audit: dict | None) -> str:
    """`fedtune audit`'s result: accountant ε next to the audited lower bound."""
    if not audit:
        return ""
    row = [escape(str(audit["mode"])), escape(str(audit["audited"])), str(audit["m"]),
           f"{audit['correct']}/{audit['guesses']}", f"{audit['confidence']:.0%}",
           _f(audit["accountant_epsilon"]), _f(audit["lower_bound"]),
           "yes" if audit["passed"] else "NO"]
    return (f"<h2>Empirical privacy audit</h2><p>{escape(wording.AUDIT_METHOD)}</p>"
            + _table(["mode", "what was audited", "canaries m", "right guesses", "confidence",
                      f"accountant ε ({escape(str(audit['accountant']).upper())})",
                      "audited lower bound ε", "bound ≤ accountant ε"], [row], left=2)
            + f"<p><b>{escape(audit['meaning'])}</b></p>")


def render_html(report: dict) -> str:
    png = base64.b64encode(epsilon_plot(report)).decode("ascii")
    guarantees = []
    for s in report["sites"]:
        run = _focus(s)
        eps = run[f"epsilon_{s['accountant']}"] if run else 0.0
        cls = "guarantee nodp" if run and run.get("sent_without_dp") else "guarantee"
        guarantees.append(
            f'<div class="{cls}"><b>{escape(s["site_id"])}</b> '
            f'({_f(s["records"])} records'
            + (f', {_f(s["persons"])} persons' if s.get("persons") else "") + '). '
            f'{escape(wording.sample_level(s, run, eps))} '
            f'{escape(wording.site_total(s))}</div>'
        )
    if report.get("central_dp"):
        guarantees.append(f'<div class="guarantee site-level">'
                          f'{escape(wording.site_level(report["central_dp"]))}</div>')
    warnings = "".join(f'<div class="warn">⚠ {escape(w["message"])}</div>'
                       for w in report["warnings"]) or "<p>None.</p>"
    accountants = "".join(f"<li>{escape(v)}</li>" for v in wording.ACCOUNTANTS.values())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>fedtune privacy report — {escape(str(report.get('run_id')))}</title>
<style>{CSS}</style></head><body>
<h1>Privacy report — run {escape(str(report.get('run_id')))}</h1>
<p class="meta">Generated {escape(report['generated_at'])} by <code>fedtune report</code> from
<code>{escape(report['source'])}</code>. Every ε below is read from the sites' privacy ledgers,
which each site writes (and flushes to disk) before it uses its data in a round.</p>
<h2>Guarantee</h2>
<p>Differential privacy per site: each site's privacy is stated for its own data, per record or
per person (the site's privacy unit, said for each site below), over all the rounds of the run
composed. Rounds a site declined cost it nothing.</p>
{''.join(guarantees)}
{_threat_model()}
<h2>Warnings</h2>{warnings}
<h2>ε over rounds</h2>
<img alt="per-site epsilon over rounds" src="data:image/png;base64,{png}">
<h2>Sites</h2>
{_sites_table(report)}
<h2>Mechanism and accounting</h2>
<p>{escape(wording.MECHANISM)}</p>
<p>{escape(wording.PERSON_MECHANISM)}</p>
<p>Each round's spend is recorded with two accountants; the budget is planned and enforced with
the one named per site in the table.</p><ul>{accountants}</ul>
{_central_section(report.get('central_dp'))}
{_audit_section(report.get('audit'))}
<h2>What left each site</h2>
<p>{escape(wording.NEVER_DATA)}</p>
{_disclosure_table(report)}
{''.join(_site_rounds(s) for s in report['sites'])}
</body></html>
"""
