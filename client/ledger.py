"""The site's privacy ledger: every DP round it trained, committed durably before the update leaves.

SQLite in WAL mode with synchronous=FULL: `record_round` returns only after the row is fsync'ed,
so a crash after it can only over-count the spend (the update may never have been sent), never
under-count it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.privacy import Mechanism, epsilon

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
    epsilon_run REAL NOT NULL,
    epsilon_total REAL NOT NULL,
    recorded_at REAL NOT NULL
)
"""


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

    @property
    def mechanism(self) -> Mechanism:
        return (self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyLedger:
    """Per-site ledger stored in `<state_dir>/privacy_ledger.sqlite`."""

    FILENAME = "privacy_ledger.sqlite"

    def __init__(self, state_dir: str | Path, site_id: str) -> None:
        self.path = Path(state_dir) / self.FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.site_id = site_id
        with self._connect() as db:
            db.execute(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection that commits (fsync'ed) on success and is always closed."""
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # fsync on every commit
            with db:
                yield db

    def rows(self, run_id: str | None = None) -> list[LedgerRow]:
        query = "SELECT * FROM rounds WHERE site_id = ?"
        args: list = [self.site_id]
        if run_id is not None:
            query += " AND run_id = ?"
            args.append(run_id)
        with self._connect() as db:
            cur = db.execute(query + " ORDER BY recorded_at, round", args)
            return [LedgerRow(*r) for r in cur.fetchall()]

    def history(self, run_id: str | None = None) -> list[Mechanism]:
        return [r.mechanism for r in self.rows(run_id)]

    def spent(self, delta: float, accountant: str = "rdp", run_id: str | None = None) -> float:
        return epsilon(self.history(run_id), delta, accountant)

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
    ) -> LedgerRow:
        """Append one round's spend and fsync it. Call before the update is sent."""
        mech = (noise_multiplier, sample_rate, steps)
        eps_run = epsilon([*self.history(run_id), mech], delta, accountant)
        eps_total = epsilon([*self.history(), mech], delta, accountant)
        row = LedgerRow(
            run_id, self.site_id, round, noise_multiplier, sample_rate, steps, max_grad_norm,
            delta, records, accountant, eps_run, eps_total, time.time(),
        )
        with self._connect() as db:
            db.execute(
                "INSERT INTO rounds VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    row.run_id, row.site_id, row.round, row.noise_multiplier, row.sample_rate,
                    row.steps, row.max_grad_norm, row.delta, row.records, row.accountant,
                    row.epsilon_run, row.epsilon_total, row.recorded_at,
                ),
            )
        return row
