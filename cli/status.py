"""`fedtune status`: where a run or a site stands, for an operator.

- A coordinator's run directory: the run, its last round of all, the sites expected and
  connected by name with when each was last seen, the ε each site reported, what the next round
  waits for, finished or not. The live part comes from `status.json`, which `fedtune server`
  keeps up to date (server/status_file.py); the rest from metrics.jsonl and config.toml.
- A site's privacy ledger (the file, the site's state directory or its site.toml): every run in
  it, the ε spent per run and over all runs, the last round, refusals and declines.

A rich table by default, `--json` for machines. Registered on the main typer app by cli/main.py.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import tomllib
import typer

from fedtune.cli.console import console
from fedtune.cli.console import fail as _fail

# common/ledger.py's PrivacyLedger.FILENAME, named here so that a run directory's status does
# not import the ledger (and with it PyTorch and Opacus, seconds).
LEDGER_FILE = "privacy_ledger.sqlite"
STALE_S = 30.0  # status.json older than this while the run is not over: say so
EXPECTED = ("a coordinator's run directory (holding metrics.jsonl, status.json or config.toml), "
            "a site's privacy_ledger.sqlite, the site's state directory, or its site.toml")


class StatusInputError(ValueError):
    """The path is neither a run directory nor a site's ledger; the message says what is."""


def _order(site_id: str) -> tuple[int, str]:
    return len(site_id), site_id


def _iso(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# ---------------------------------------------------------------------------------------------
# What the path is.


def _site_toml_ledger(path: Path) -> Path:
    from fedtune.client.site_config import load_site_config
    from fedtune.common.config import ConfigError

    try:
        cfg = load_site_config(path, check_files=False)
    except ConfigError as e:
        raise StatusInputError(f"{path}: {e}") from None
    ledger = cfg.state_dir / LEDGER_FILE
    if not ledger.is_file():
        raise StatusInputError(f"{path}: the site's ledger {ledger} does not exist yet (state_dir "
                               f"= {cfg.state_dir}); the site has not taken part in a run")
    return ledger


def classify(source: Path) -> tuple[str, Path]:
    """("run", run_dir) or ("site", ledger file); StatusInputError for anything else."""
    from fedtune.common.run_layout import RunLayout
    from fedtune.server.status_file import status_path

    if not source.exists():
        raise StatusInputError(f"{source}: no such file or directory; expected {EXPECTED}")
    if source.is_dir():
        layout = RunLayout(source)
        if any(p.is_file() for p in (layout.metrics, layout.config, status_path(source))):
            return "run", source
        if (source / LEDGER_FILE).is_file():
            return "site", source / LEDGER_FILE
        if (source / "site.toml").is_file():
            return "site", _site_toml_ledger(source / "site.toml")
        raise StatusInputError(f"{source}: this directory holds no fedtune run or ledger; "
                               f"expected {EXPECTED}")
    if source.suffix == ".toml":
        try:
            data = tomllib.loads(source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise StatusInputError(f"{source}: not a readable TOML file ({e}); expected "
                                   f"{EXPECTED}") from None
        if "site_id" in data and "state_dir" in data:
            return "site", _site_toml_ledger(source)
        if source.name == "config.toml" and RunLayout(source.parent).metrics.is_file():
            return "run", source.parent
        raise StatusInputError(f"{source}: neither a site.toml nor a run's config.toml; "
                               f"expected {EXPECTED}")
    from fedtune.common.ledger import PrivacyLedger

    try:
        PrivacyLedger.from_file(source)
    except (ValueError, sqlite3.DatabaseError) as e:
        raise StatusInputError(f"{source}: not a fedtune privacy ledger ({e}); expected "
                               f"{EXPECTED}") from None
    return "site", source


# ---------------------------------------------------------------------------------------------
# A coordinator's run directory.


def _configured_rounds(run_dir: Path) -> int | None:
    from fedtune.common.run_layout import RunLayout

    try:
        cfg = tomllib.loads(RunLayout(run_dir).config.read_text(encoding="utf-8"))
        return int(cfg["federation"]["rounds"])
    except (OSError, KeyError, TypeError, ValueError, tomllib.TOMLDecodeError):
        return None


# A site that has reported nothing yet (expected, or connected, before its first reply).
NOTHING_REPORTED: dict[str, Any] = {
    "epsilon": None, "delta": None, "noise_multiplier": None, "accountant": None,
    "epsilon_round": None, "last_status": None, "last_reason": None, "last_round": None,
    "rounds_trained": 0}


def reported_by_site(rounds: list[dict]) -> dict[str, dict[str, Any]]:
    """What each site last reported in metrics.jsonl: its ε (with δ, σ, accountant and the
    round it came with), its last status and reason, and how many rounds it trained."""
    from fedtune.common.round_record import dropped_sites

    blank = dict(NOTHING_REPORTED)
    out: dict[str, dict[str, Any]] = {}
    for rec in sorted(rounds, key=lambda r: r.get("round", 0)):
        for s in rec.get("sites") or []:
            sid = str(s.get("site_id", "?"))
            d = out.setdefault(sid, {**blank})
            status = s.get("status") or "ok"
            d.update(last_status=status, last_reason=s.get("reason"), last_round=rec.get("round"))
            d["rounds_trained"] += status == "ok"
            if s.get("epsilon") is not None:
                d.update(epsilon=s["epsilon"], delta=s.get("delta"),
                         noise_multiplier=s.get("noise_multiplier"),
                         accountant=s.get("accountant"), epsilon_round=rec.get("round"))
        for d in dropped_sites(rec):  # sent nothing: named by the coordinator
            entry = out.setdefault(d["site_id"], {**blank})
            entry.update(last_status="dropped", last_reason=d["reason"],
                         last_round=rec.get("round"))
    return out


def run_status(run_dir: Path, now: float | None = None) -> dict[str, Any]:
    """The status of a coordinator's run directory, JSON-ready."""
    from fedtune.common.round_record import read_rounds
    from fedtune.server.status_file import load_status, status_path

    now = time.time() if now is None else now
    rounds = read_rounds(run_dir)
    live = load_status(run_dir)
    total = (live or {}).get("rounds") or _configured_rounds(run_dir)
    done = max((int(r["round"]) for r in rounds if "round" in r), default=None)
    reported = reported_by_site(rounds)
    seen = {s["site_id"]: s for s in (live or {}).get("sites") or []}
    expected = list((live or {}).get("expected_sites") or [])
    names = sorted(set(expected) | set(seen) | set(reported), key=_order)
    state = (live or {}).get("state")
    finished = state == "finished" or (total is not None and done is not None and done >= total)
    notes = []
    if live is None:
        state = "finished" if finished else "unknown"
        notes.append(f"no {status_path(run_dir).name}: connections are unknown (a simulation, "
                     "or a run started by an older fedtune server)")
    elif state not in ("finished", "interrupted", "stopped") and (
            now - float(live.get("updated_at") or 0) > STALE_S):
        notes.append(f"{status_path(run_dir).name} was last updated "
                     f"{now - float(live.get('updated_at') or 0):.0f} s ago: is `fedtune server` "
                     "still running?")
    if live is not None and state in ("interrupted", "stopped"):
        notes.append("the coordinator stopped before the run finished: restart it with "
                     "`fedtune server ... --resume`")
    sites = []
    for sid in names:
        node, rep = seen.get(sid), reported.get(sid, NOTHING_REPORTED)
        last_seen = node.get("last_seen") if node else None
        sites.append({
            "site_id": sid,
            "expected": sid in expected if expected else None,
            "connected": (node["connected"] if node else (False if live else None)),
            "node_status": node.get("status") if node else None,
            "last_seen": _iso(last_seen),
            "last_seen_s_ago": None if last_seen is None else round(now - last_seen, 1),
            **{f"reported_{k}" if k in ("epsilon", "delta", "noise_multiplier",
                                        "accountant") else k: v for k, v in rep.items()},
        })
    return {
        "kind": "coordinator_run",
        "run_dir": str(run_dir),
        "run_id": (live or {}).get("run_id") or next(
            (r["run_id"] for r in rounds if r.get("run_id")), run_dir.name),
        "flower_run_id": (live or {}).get("flower_run_id"),
        "state": state,
        "flower_status": (live or {}).get("flower_status"),
        "finished": finished,
        "rounds": total,
        "last_round": done,
        "current_round": (None if finished or state not in ("running", "starting")
                          else (done or 0) + 1),
        "num_sites": (live or {}).get("num_sites"),
        "min_fit_sites": (live or {}).get("min_fit_sites"),
        "connected": [s["site_id"] for s in sites if s["connected"]],
        "waiting_for": (live or {}).get("waiting_for"),
        "status_updated_at": _iso((live or {}).get("updated_at")),
        "sites": sites,
        "epsilon_source": "reported by each site to the coordinator (metrics.jsonl); each "
                          "site's privacy ledger is the source of truth",
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------
# A site's ledger.


def retried_rounds(round_numbers: list[int]) -> dict[int, int]:
    """{round: extra attempts} of rounds the ledger holds more than once (a retried round is
    a second spend, and both count)."""
    counts: dict[int, int] = {}
    for r in round_numbers:
        counts[r] = counts.get(r, 0) + 1
    return {r: n - 1 for r, n in sorted(counts.items()) if n > 1}


def ledger_status(path: Path) -> dict[str, Any]:
    """Every site and run in a ledger file: ε per run and over all runs, last round,
    refusals and declines, as the ledger (the source of truth) holds them."""
    from fedtune.common.ledger import PrivacyLedger

    ledger = PrivacyLedger.from_file(path)
    sites = []
    for site_id in ledger.site_ids():
        site = PrivacyLedger.from_file(path, site_id)
        rows, declines = site.rows(), site.declines()
        plans = {run_id: plan for run_id, _, plan in site.plans()}
        runs = []
        for run_id in site.run_ids():
            rr = [r for r in rows if r.run_id == run_id]
            dd = [d for d in declines if d.run_id == run_id]
            plan = plans.get(run_id)
            stamps = [r.recorded_at for r in rr] + [d.recorded_at for d in dd]
            runs.append({
                "run_id": run_id,
                "rounds_trained": len(rr),
                "retried": {str(k): v for k, v in retried_rounds([r.round for r in rr]).items()},
                "last_round": max([r.round for r in rr] + [d.round for d in dd], default=None),
                "rounds_planned": plan.rounds if plan else None,
                "epsilon": rr[-1].epsilon_run if rr else 0.0,
                "delta": rr[-1].delta if rr else (plan.delta if plan else None),
                "accountant": rr[-1].accountant if rr else (plan.accountant if plan else None),
                "target_epsilon": plan.target_epsilon if plan else None,
                "refusals": [{"round": d.round, "reason": d.reason} for d in dd
                             if d.reason.startswith("refused")],
                "declines": [{"round": d.round, "reason": d.reason} for d in dd
                             if not d.reason.startswith("refused")],
                "last_activity": _iso(max(stamps, default=None)),
            })
        latest_plan = next((p for _, sid, p in reversed(site.plans()) if sid == site_id), None)
        budget = latest_plan.max_epsilon if latest_plan else None
        lifetime = rows[-1].epsilon_total if rows else 0.0
        sites.append({
            "site_id": site_id,
            "epsilon_lifetime": lifetime,
            "accountant": rows[-1].accountant if rows else None,
            "delta": rows[-1].delta if rows else None,
            "max_epsilon": budget,
            "budget_used": lifetime / budget if budget else None,
            "runs": runs,
        })
    return {"kind": "site_ledger", "ledger": str(path), "sites": sites,
            "epsilon_source": "this ledger (the source of truth for the site's spend)"}


# ---------------------------------------------------------------------------------------------
# Display.


def _g(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


def _ago(s: float | None) -> str:
    if s is None:
        return ""
    if s < 120:
        return f" ({s:.0f} s ago)"
    return f" ({s / 60:.0f} min ago)" if s < 7200 else f" ({s / 3600:.1f} h ago)"


def show_run(data: dict[str, Any]) -> None:
    from rich.table import Table

    total = data["rounds"] if data["rounds"] is not None else "?"
    done = data["last_round"]
    where = ("no round completed yet" if done is None
             else "initial evaluation done, no round yet" if done == 0
             else f"round {done} of {total} completed")
    if data["finished"]:
        verdict = "[green]finished[/green]"
    elif data["state"] in ("interrupted", "stopped"):
        verdict = f"[red]{data['state']}[/red], not finished"
    else:
        verdict = f"[yellow]{data['state']}[/yellow], not finished"
    console.print(f"run [bold]{data['run_id']}[/bold]: {where}; {verdict}"
                  + (f" (Flower: {data['flower_status']})" if data["flower_status"] else ""),
                  highlight=False)
    if data["current_round"] is not None and data["rounds"] is not None:
        console.print(f"current round: {data['current_round']} of {data['rounds']}",
                      highlight=False)
    if data["waiting_for"]:
        console.print(f"waiting for: {data['waiting_for']}", highlight=False)
    table = Table(title=None, show_lines=False)
    for col in ("site", "expected", "connected", "last seen (UTC)", "ε reported", "δ",
                "reported in round", "last status", "rounds trained"):
        table.add_column(col, justify="left" if col in ("site", "last status") else "right")
    for s in data["sites"]:
        conn = s["connected"]
        status = s.get("last_status") or "–"
        if s.get("last_reason"):
            status += f": {s['last_reason']}"
        table.add_row(
            s["site_id"],
            "–" if s["expected"] is None else ("yes" if s["expected"] else "no"),
            "?" if conn is None else ("[green]yes[/green]" if conn else "[red]no[/red]"),
            ((s["last_seen"] or "").replace("T", " ").rstrip("Z") + _ago(s["last_seen_s_ago"]))
            or "–",
            _g(s.get("reported_epsilon")), _g(s.get("reported_delta"), 3),
            str(s.get("epsilon_round") if s.get("epsilon_round") is not None else "–"),
            status, str(s.get("rounds_trained", 0)),
        )
    console.print(table)
    console.print(f"ε: {data['epsilon_source']}.", highlight=False)
    for note in data["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)


def show_ledger(data: dict[str, Any]) -> None:
    from rich.table import Table

    console.print(f"ledger {data['ledger']}", highlight=False)
    if not data["sites"]:
        console.print("the ledger holds no run yet")
    for s in data["sites"]:
        acc = (s["accountant"] or "rdp").upper()
        head = (f"[bold]{s['site_id']}[/bold]: ε = {_g(s['epsilon_lifetime'])} over all runs "
                f"({acc}" + (f", δ = {s['delta']:g})" if s["delta"] is not None else ")"))
        if s["max_epsilon"]:
            head += (f", {s['budget_used']:.0%} of its budget max_epsilon = "
                     f"{s['max_epsilon']:g}")
        else:
            head += ", no lifetime budget (site.toml \\[privacy] max_epsilon)"
        console.print(head, highlight=False)
        table = Table()
        for col in ("run", "rounds trained", "last round", "ε this run", "δ", "refused",
                    "declined", "last activity (UTC)"):
            table.add_column(col, justify="left" if col in ("run", "refused", "declined")
                             else "right")
        for r in s["runs"]:
            trained = str(r["rounds_trained"])
            if r["retried"]:
                trained += " (" + ", ".join(
                    f"round {k} retried {'once' if v == 1 else f'{v} times'}"
                    for k, v in r["retried"].items()) + ")"
            table.add_row(
                r["run_id"], trained, str(r["last_round"] if r["last_round"] is not None
                                          else "–"),
                _g(r["epsilon"]), _g(r["delta"], 3),
                "; ".join(f"round {d['round']}: {d['reason']}" for d in r["refusals"]) or "–",
                "; ".join(f"round {d['round']}: {d['reason']}" for d in r["declines"]) or "–",
                (r["last_activity"] or "–").replace("T", " ").rstrip("Z"),
            )
        console.print(table)


def status(
    source: Path = typer.Argument(..., help="A coordinator's run directory (runs/<run>), or a "
                                  "site's privacy_ledger.sqlite, state directory or site.toml."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Where a run stands (coordinator) or what a site's ledger holds (site)."""
    try:
        kind, path = classify(source)
        data = run_status(path) if kind == "run" else ledger_status(path)
    except StatusInputError as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
    elif kind == "run":
        show_run(data)
    else:
        show_ledger(data)


def register_status_command(app: typer.Typer) -> None:
    app.command("status")(status)
