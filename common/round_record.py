"""Reading a round's record of metrics.jsonl (server/recorder.py writes it): what `fedtune
status` and the run-level report (report/run_level.py) both need, without heavy imports."""

from __future__ import annotations

from typing import Any


def dropped_sites(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """[{site_id, reason}] of the sites a round's record names as dropped out (died, lost its
    link, timed out; they sent nothing): `participation.dropped` ({site: reason}), or a list of
    names or {site_id, reason} dicts."""
    raw = (rec.get("participation") or {}).get("dropped") or rec.get("dropped") or []
    if isinstance(raw, dict):
        return [{"site_id": str(k), "reason": v} for k, v in raw.items()]
    return [{"site_id": str(d.get("site_id", "?")), "reason": d.get("reason")}
            if isinstance(d, dict) else {"site_id": str(d), "reason": None} for d in raw]
