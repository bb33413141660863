"""The site's privacy ledger: every DP round it trained, committed durably before the update leaves.

SQLite in WAL mode with synchronous=FULL: every write returns only after it is fsync'ed, so a
crash after `record_round` can only over-count the spend (the update may never have been sent),
never under-count it.

Tables (one file per site, `<state_dir>/privacy_ledger.sqlite`; runs accumulate in it):
- `rounds`   one row per DP round started: mechanism parameters and the cumulative epsilon of the
             run and of all runs at this site, from both accountants (RDP and PRV), whether
             its sampling and noise were secret (OS entropy) or from a known seed, and the unit
             of privacy ('record', or the person column of a person-level run, with its persons).
- `plans`    the budget plan of each run (noise multiplier, sample rate, budgets), fixed at its
             first round.
- `payloads` what left the site each round: size and SHA-256 of the serialized update, never data.
- `declines` rounds the site declined (budget exhausted), with the reason.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedtune.common.privacy import BudgetPlan, Mechanism, epsilon, epsilons

SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    -- No uniqueness on (run, site, round): a retried round is a second spend, and both count.
    run_id TEXT NOT NULL,
    site_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    max_grad_norm REAL NOT NULL,
    delta REAL NOT NULL,
    records INTEGER NOT NULL,
    accountant TEXT NOT NULL,
    epsilon_run REAL NOT NULL,      -- with `accountant`, the one that enforces the budget
    epsilon_total REAL NOT NULL,
    recorded_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS plans (
    run_id TEXT NOT NULL,
    site_id TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps_per_round INTEGER NOT NULL,
    rounds INTEGER NOT NULL,
    records INTEGER NOT NULL,
    delta REAL NOT NULL,
    max_grad_norm REAL NOT NULL,
    accountant TEXT NOT NULL,
    target_epsilon REAL,
    max_epsilon REAL,
    calibrated INTEGER NOT NULL,
    planned_epsilon REAL NOT NULL,
    prior_epsilon REAL NOT NULL,
    projected_total REAL NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (run_id, site_id)
);
CREATE TABLE IF NOT EXISTS payloads (
    run_id TEXT NOT NULL,
    site_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    status TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    tensors INTEGER NOT NULL,
    recorded_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS declines (
    run_id TEXT NOT NULL,
    site_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    reason TEXT NOT NULL,
    recorded_at REAL NOT NULL
);
"""
# Columns added after the first schema (older rows keep NULL): both accountants' epsilon on
# every round, and whether the round's randomness was secret (1), from a seed (0), unknown (NULL).
# The unit of privacy ("record", or the person column of a person-level run; older rows:
# 'record') and, at person level, the persons that q and δ counted.
ADDED_ROUND_COLUMNS = {"epsilon_run_rdp": "REAL", "epsilon_run_prv": "REAL",
                       "epsilon_total_rdp": "REAL", "epsilon_total_prv": "REAL",
                       "secret_randomness": "INTEGER",
                       "privacy_unit": "TEXT NOT NULL DEFAULT 'record'",
                       "persons": "INTEGER"}
# Plans: the privacy unit, the person column, persons and the largest person's records.
ADDED_PLAN_COLUMNS = {"privacy_unit": "TEXT NOT NULL DEFAULT 'record'",
                      "person_column": "TEXT", "persons": "INTEGER",
                      "max_person_records": "INTEGER"}


@dataclass(frozen=True)
class LedgerRow:
    run_id: str
    site_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    records: int
    accountant: str
    epsilon_run: float
    epsilon_total: float
    recorded_at: float
    epsilon_run_rdp: float | None = None
    epsilon_run_prv: float | None = None
    epsilon_total_rdp: float | None = None
    epsilon_total_prv: float | None = None
    # Poisson sampling and noise from OS entropy (True), from a seed someone may know (False);
    # None: a row written before this was recorded.
    secret_randomness: bool | None = None
    # "record", or the person column: ε is per person (persons: how many q and δ counted).
    privacy_unit: str = "record"
    persons: int | None = None

    def __post_init__(self) -> None:
        if self.secret_randomness is not None:  # SQLite gives 0 / 1
            object.__setattr__(self, "secret_randomness", bool(self.secret_randomness))

    @property
    def mechanism(self) -> Mechanism:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class PayloadRow:
    run_id: str
    site_id: str
    round: int
    status: str
    bytes: int
    sha256: str
    tensors: int
    recorded_at: float


@dataclass(frozen=True)
class DeclineRow:
    run_id: str
    site_id: str
    round: int
    reason: str
    recorded_at: float


def _columns(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _migrate(db: sqlite3.Connection) -> None:
    """Create missing tables and add columns that older ledgers lack (their rows keep NULL)."""
    db.executescript(SCHEMA)
    have = {r[1] for r in db.execute("PRAGMA table_info(rounds)")}
    for col, kind in ADDED_ROUND_COLUMNS.items():
        if col not in have:
            db.execute(f"ALTER TABLE rounds ADD COLUMN {col} {kind}")
    have = {r[1] for r in db.execute("PRAGMA table_info(plans)")}
    for col, kind in ADDED_PLAN_COLUMNS.items():
        if col not in have:
            db.execute(f"ALTER TABLE plans ADD COLUMN {col} {kind}")


class PrivacyLedger:
    """Per-site ledger stored in `<state_dir>/privacy_ledger.sqlite`.

    `site_id=None` reads every site found in the file (reports); writes need a site id.
    """

    FILENAME = "privacy_ledger.sqlite"

    def __init__(self, state_dir: str | Path, site_id: str | None) -> None:
        self.path = Path(state_dir) / self.FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.site_id = site_id
        with self._connect() as db:
            _migrate(db)

    @classmethod
    def from_file(cls, path: str | Path, site_id: str | None = None) -> PrivacyLedger:
        """Open an existing ledger file (any name), e.g. for a report."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no privacy ledger at {path}")
        ledger = cls.__new__(cls)
        ledger.path, ledger.site_id = path, site_id
        with ledger._connect() as db:
            names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            if "rounds" not in names:
                raise ValueError(f"{path} is not a fedtune privacy ledger (no 'rounds' table)")
            _migrate(db)
        return ledger

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection that commits (fsync'ed) on success and is always closed."""
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # fsync on every commit
            with db:
                yield db

    def _where(self, run_id: str | None) -> tuple[str, list]:
        """WHERE clause and arguments selecting this site (if any) and run (if given)."""
        query, args = " WHERE 1=1", []
        if self.site_id is not None:
            query += " AND site_id = ?"
            args.append(self.site_id)
        if run_id is not None:
            query += " AND run_id = ?"
            args.append(run_id)
        return query, args

    def _select(self, cls: type, table: str, run_id: str | None, order: str) -> list:
        where, args = self._where(run_id)
        query = f"SELECT {', '.join(_columns(cls))} FROM {table}{where} ORDER BY {order}"
        with self._connect() as db:
            return [cls(*r) for r in db.execute(query, args).fetchall()]

    def _require_site(self) -> str:
        if self.site_id is None:
            raise ValueError("this ledger was opened for reading all sites; give a site_id")
        return self.site_id

    # ---- reading -------------------------------------------------------------------------

    def rows(self, run_id: str | None = None) -> list[LedgerRow]:
        return self._select(LedgerRow, "rounds", run_id, "recorded_at, round")

    def payloads(self, run_id: str | None = None) -> list[PayloadRow]:
        return self._select(PayloadRow, "payloads", run_id, "recorded_at, round")

    def declines(self, run_id: str | None = None) -> list[DeclineRow]:
        return self._select(DeclineRow, "declines", run_id, "recorded_at, round")

    def plans(self, run_id: str | None = None) -> list[tuple[str, str, BudgetPlan]]:
        """(run_id, site_id, plan) of every run, oldest first."""
        cols = [f.name for f in fields(BudgetPlan)]
        where, args = self._where(run_id)
        query = f"SELECT run_id, site_id, {', '.join(cols)} FROM plans{where}"
        with self._connect() as db:
            out = db.execute(query + " ORDER BY created_at", args).fetchall()
        plans = []
        for r in out:
            values = dict(zip(cols, r[2:], strict=True))
            values["calibrated"] = bool(values["calibrated"])
            plans.append((r[0], r[1], BudgetPlan(**values)))
        return plans

    def plan(self, run_id: str) -> BudgetPlan | None:
        self._require_site()
        found = self.plans(run_id)
        return found[0][2] if found else None

    def site_ids(self) -> list[str]:
        with self._connect() as db:
            ids = {r[0] for t in ("rounds", "plans", "declines", "payloads")
                   for r in db.execute(f"SELECT DISTINCT site_id FROM {t}")}
        return sorted(ids, key=lambda s: (len(s), s))

    def run_ids(self) -> list[str]:
        """Runs in the order they first appear in the ledger."""
        seen: dict[str, float] = {}
        with self._connect() as db:
            for t, col in (("plans", "created_at"), ("rounds", "recorded_at"),
                           ("declines", "recorded_at"), ("payloads", "recorded_at")):
                for run_id, first in db.execute(
                    f"SELECT run_id, MIN({col}) FROM {t} GROUP BY run_id"
                ):
                    seen[run_id] = min(seen.get(run_id, first), first)
        return sorted(seen, key=seen.__getitem__)

    def history(self, run_id: str | None = None) -> list[Mechanism]:
        return [r.mechanism for r in self.rows(run_id)]

    def spent(self, delta: float, accountant: str = "rdp", run_id: str | None = None) -> float:
        return epsilon(self.history(run_id), delta, accountant)

    def declined(self, run_id: str) -> bool:
        return bool(self.declines(run_id))

    # ---- writing (each call is one fsync'ed transaction) ----------------------------------

    def save_plan(self, run_id: str, plan: BudgetPlan) -> None:
        site = self._require_site()
        values = asdict(plan)
        cols = ["run_id", "site_id", *values, "created_at"]
        with self._connect() as db:
            db.execute(
                f"INSERT OR IGNORE INTO plans ({', '.join(cols)}) "
                f"VALUES ({', '.join('?' * len(cols))})",
                [run_id, site, *values.values(), time.time()],
            )

    def record_round(
        self,
        *,
        run_id: str,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        max_grad_norm: float,
        delta: float,
        records: int,
        accountant: str,
        secret_randomness: bool | None = None,
        privacy_unit: str = "record",
        persons: int | None = None,
    ) -> LedgerRow:
        """Append one round's spend and fsync it. Call before the data is used.

        `secret_randomness`: whether the round samples and noises from OS entropy (None: not
        said; the report treats it as unknown)."""
        site = self._require_site()
        mech = (noise_multiplier, sample_rate, steps)
        run_history, site_history = self.history(run_id), self.history()
        run = epsilons([*run_history, mech], delta)
        total = run if run_history == site_history else epsilons([*site_history, mech], delta)
        row = LedgerRow(
            run_id, site, round, noise_multiplier, sample_rate, steps, max_grad_norm,
            delta, records, accountant, run[accountant], total[accountant], time.time(),
            run["rdp"], run["prv"], total["rdp"], total["prv"], secret_randomness,
            privacy_unit, persons,
        )
        self._insert("rounds", LedgerRow, row)
        return row

    def record_payload(self, *, run_id: str, round: int, status: str, size: int, sha256: str,
                       tensors: int) -> PayloadRow:
        """What is about to leave the site (size and hash of the serialized update)."""
        row = PayloadRow(run_id, self._require_site(), round, status, size, sha256, tensors,
                         time.time())
        self._insert("payloads", PayloadRow, row)
        return row

    def record_decline(self, *, run_id: str, round: int, reason: str) -> DeclineRow:
        row = DeclineRow(run_id, self._require_site(), round, reason, time.time())
        self._insert("declines", DeclineRow, row)
        return row

    def _insert(self, table: str, cls: type, row: object) -> None:
        cols = _columns(cls)
        with self._connect() as db:
            db.execute(
                f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [getattr(row, c) for c in cols],
            )
