"""Reading a round's record of metrics.jsonl (server/recorder.py writes it): what `fedtune
status`, the run-level report (report/run_level.py) and the simulation's summary all need,
without heavy imports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.common.run_layout import RunLayout


def dropped_sites(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """[{site_id, reason}] of the sites a round's record names as dropped out (died, lost its
    link, timed out; they sent nothing): `participation.dropped` ({site: reason}), or a list of
    names or {site_id, reason} dicts."""
    raw = (rec.get("participation") or {}).get("dropped") or rec.get("dropped") or []
    if isinstance(raw, dict):
        return [{"site_id": str(k), "reason": v} for k, v in raw.items()]
    return [{"site_id": str(d.get("site_id", "?")), "reason": d.get("reason")}
            if isinstance(d, dict) else {"site_id": str(d), "reason": None} for d in raw]


def read_rounds(run_dir: Path) -> list[dict]:
    """The round records of a run directory's metrics.jsonl (empty if there is none)."""
    path = RunLayout(Path(run_dir)).metrics
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip().endswith("}"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line of a killed writer
    return out
