"""Start-up checks of a site daemon, before its SuperNode starts (and before any training).

`fedtune client` (and `--check`) runs them after site.toml itself was validated
(client/site_config.py). Each problem is one `key: problem` line that names the file, line or
key, and what to do. Nothing is written: the state-directory probe removes its own file, and the
privacy ledger is only opened if it exists (an integrity check that writes nothing).

- data: every line parses, at least one record, no missing column, text fields non-empty,
  no absurdly large record (common/input_checks.py); the run-specific checks (the run's
  columns, its label set) happen when the run arrives, before the ledger spends anything.
- privacy.delta: below 1 / records (the site's own delta, when site.toml sets one).
- state_dir: a directory, writable (a real write + fsync, which also catches a read-only file
  system), with at least `MIN_FREE_BYTES` free: the ledger must be able to commit every round.
- the privacy ledger, if present: a readable SQLite file that passes `PRAGMA quick_check`.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

from fedtune.client.site_config import SiteConfig
from fedtune.common.data import DataError, read_records
from fedtune.common.input_checks import check_file_records
from fedtune.common.privacy import PrivacyBudgetError, check_delta

MIN_FREE_BYTES = 64 * 2**20  # ledger, Flower's home, local copies of sent updates
LEDGER_FILE = "privacy_ledger.sqlite"  # common/ledger.py's PrivacyLedger.FILENAME


def check_data(cfg: SiteConfig) -> tuple[list[str], int]:
    """(problems, number of records)."""
    try:
        records = read_records(cfg.data)
        check_file_records(records)
    except DataError as e:
        msg = str(e)
        return [f"data: {msg if str(cfg.data) in msg else f'{cfg.data}: {msg}'}"], 0
    problems = []
    if cfg.privacy.delta is not None:
        try:
            check_delta(cfg.privacy.delta, len(records), where=f"{cfg.data}: ")
        except PrivacyBudgetError as e:
            problems.append(f"privacy.delta: {str(e).replace('dp.delta', 'privacy.delta')}")
    return problems, len(records)


def check_state_dir(state_dir: Path, min_free: int | None = None) -> list[str]:
    min_free = MIN_FREE_BYTES if min_free is None else min_free
    state_dir = Path(state_dir)
    if state_dir.exists() and not state_dir.is_dir():
        return [f"state_dir: {state_dir} exists and is not a directory"]
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return [f"state_dir: cannot create {state_dir}: {e.strerror or e}"]
    try:
        fd, probe = tempfile.mkstemp(prefix=".fedtune-probe-", dir=state_dir)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        hint = " (the disk is full)" if e.errno == 28 else ""
        return [f"state_dir: cannot write to {state_dir}: {e.strerror or e}{hint}"]
    free = shutil.disk_usage(state_dir).free
    if free < min_free:
        return [f"state_dir: only {free / 2**20:.1f} MiB free on the disk of {state_dir} "
                f"(at least {min_free / 2**20:.0f} MiB needed: the privacy ledger must be able to "
                "commit every round); free some space or move state_dir"]
    return []


def check_ledger(state_dir: Path) -> list[str]:
    path = Path(state_dir) / LEDGER_FILE
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(path, timeout=30)
        try:
            result = db.execute("PRAGMA quick_check").fetchone()
            names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        finally:
            db.close()
    except sqlite3.Error as e:
        return [f"state_dir: the privacy ledger {path} cannot be read ({e}); restore it from a "
                "backup: a site must not train without its ledger"]
    if not result or result[0] != "ok":
        return [f"state_dir: the privacy ledger {path} is damaged ({result[0] if result else '?'}"
                "); restore it from a backup: a site must not train without its ledger"]
    if "rounds" not in names:
        return [f"state_dir: {path} is not a fedtune privacy ledger (no 'rounds' table)"]
    return []


def preflight(cfg: SiteConfig) -> list[str]:
    """Every start-up problem of this site, as `key: problem` lines (empty: ready)."""
    problems, _ = check_data(cfg)
    problems += check_state_dir(cfg.state_dir)
    if not any(p.startswith("state_dir:") for p in problems):
        problems += check_ledger(cfg.state_dir)
    return problems
