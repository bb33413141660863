"""Start-up checks of a site daemon, before its SuperNode starts (and before any training).

`fedtune client` (and `--check`) runs them after site.toml itself was validated
(client/site_config.py). Each problem is one `key: problem` line that names the file, line or
key, and what to do. Nothing is written: the state-directory probe removes its own file, and the
privacy ledger is only opened if it exists (an integrity check that writes nothing).

- data: every line parses, at least one record, no missing column, text fields non-empty,
  no absurdly large record (common/input_checks.py); the run-specific checks (the run's
  columns, its label set) happen when the run arrives, before the ledger spends anything.
- privacy.delta: below 1 / records (the site's own delta, when site.toml sets one); below
  1 / persons when privacy.privacy_unit names a person column (which every record must have).
- state_dir: a directory, writable (a real write + fsync, which also catches a read-only file
  system), with at least `MIN_FREE_BYTES` free: the ledger must be able to commit every round.
- the privacy ledger, if present: a readable SQLite file that passes `PRAGMA quick_check`.

`policy_summary` states the site's privacy policy (site.toml `[privacy]`) as it will be applied.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

from fedtune.client.site_config import SiteConfig
from fedtune.common.data import DataError, person_ids, read_records
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
    unit = cfg.privacy.privacy_unit
    count, noun = len(records), "records"
    if unit not in (None, "record"):  # the site's policy requires a person column
        try:
            count, noun = len(set(person_ids(records, unit))), "persons"
        except DataError as e:
            return [f"privacy.privacy_unit: {e}"], len(records)
    if cfg.privacy.delta is not None:
        try:
            check_delta(cfg.privacy.delta, count, where=f"{cfg.data}: ", unit=noun)
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


def policy_summary(cfg: SiteConfig) -> list[str]:
    """The site's effective privacy policy, one line per key (`fedtune client --check`)."""
    from fedtune.client.site_policy import ModelDigests

    p = cfg.privacy

    def limit(value: object, text: str, default: str) -> str:
        return text.format(value) if value is not None else default

    lines = [
        "DP-SGD: " + ("optional (privacy.allow_no_dp = true)" if p.allow_no_dp
                      else "required; a run with dp.enabled = false is refused"),
        limit(p.target_epsilon, "ε of one run: at most {:g} (privacy.target_epsilon); a run "
              "asking more trains at this ε", "ε of one run: as the run asks"),
        limit(p.max_epsilon, "ε of all runs together: at most {:g} (privacy.max_epsilon); a "
              "run that cannot fit is refused", "ε of all runs together: no limit "
              "(privacy.max_epsilon)"),
        limit(p.max_delta, "δ: at most {:g} (privacy.max_delta); a run asking more is refused",
              "δ: no limit (privacy.max_delta)"),
    ]
    if p.delta is not None:
        lines.append(f"δ used: the smaller of the run's and {p.delta:g} (privacy.delta)")
    if p.noise_multiplier is not None:
        lines.append(f"noise multiplier: at least {p.noise_multiplier:g} "
                     "(privacy.noise_multiplier)")
    if p.max_grad_norm is not None:
        lines.append(f"clipping bound: {p.max_grad_norm:g} (privacy.max_grad_norm)")
    if p.accountant is not None:
        lines.append(f"accountant: {p.accountant} (privacy.accountant)")
    lines.append("privacy unit: " + (
        f"per person, column {p.privacy_unit} (privacy.privacy_unit); a run asking another "
        "column is refused" if p.privacy_unit not in (None, "record")
        else "as the run asks (data.privacy_unit)"))
    lines.append("SecAgg+: " + ("required (privacy.require_secagg)" if p.require_secagg
                                else "as the run asks"))
    if p.min_secagg_threshold_fraction is not None:
        lines.append(f"SecAgg+ threshold and share count: at least "
                     f"{p.min_secagg_threshold_fraction:g} (privacy.min_secagg_threshold_"
                     "fraction)")
    lines.append(limit(p.max_rounds, "rounds: at most {} (privacy.max_rounds)",
                       "rounds: no limit (privacy.max_rounds)"))
    if p.allowed_models is None:
        lines.append("models: any (privacy.allowed_models)")
    else:
        digests = ModelDigests(cfg.state_dir)
        for m in p.allowed_models:
            here = digests(m.name)
            state = ("not found at this site" if here is None
                     else "matches" if here.lower() == m.sha256.lower()
                     else f"DIFFERS: its weights here hash to {here}")
            lines.append(f"model allowed: {m.name} sha256 {m.sha256} ({state})")
    return lines


def preflight(cfg: SiteConfig) -> list[str]:
    """Every start-up problem of this site, as `key: problem` lines (empty: ready)."""
    problems, _ = check_data(cfg)
    problems += check_state_dir(cfg.state_dir)
    if not any(p.startswith("state_dir:") for p in problems):
        problems += check_ledger(cfg.state_dir)
    return problems
