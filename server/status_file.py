"""The coordinator's live status of a run: `<run_dir>/status.json`, for `fedtune status`.

`fedtune server` rewrites it (atomically: common/atomic.py) when it starts, after the run is
submitted, at every poll of the run (every few seconds) and when it stops. It says which sites
the coordinator expects (the registered keys), which are connected and when each was last seen
(the SuperLink's heartbeats, over its Control API), the last completed round and what the next
round waits for. What the sites reported (ε, status) stays in metrics.jsonl; the sites' ledgers
remain the source of truth for their privacy spend.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.common.atomic import atomic_write_text
from fedtune.common.run_layout import RunLayout

if TYPE_CHECKING:
    from fedtune.common.config import RunConfig
    from fedtune.server.coordinator import Coordinator

STATUS_FILE = "status.json"
FORMAT = 1
FINAL_STATES = ("finished", "interrupted", "stopped")


@dataclass(frozen=True)
class SiteSeen:
    """One site as the SuperLink lists it: connected or not, and its last sign of life."""

    site_id: str
    node_id: int
    status: str  # Flower's node status: online, offline, registered, unregistered
    last_seen: float | None  # epoch seconds of its last heartbeat or activation

    @property
    def connected(self) -> bool:
        return self.status == "online"


def status_path(run_dir: Path) -> Path:
    return Path(run_dir) / STATUS_FILE


def load_status(run_dir: Path) -> dict[str, Any] | None:
    """The last status the coordinator wrote, or None when there is none (a simulation, a run
    from before the file existed). A damaged file reads as None (its writes are atomic, so only
    something outside fedtune damages it)."""
    path = status_path(run_dir)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def last_round(run_dir: Path) -> int | None:
    """The last round whose record metrics.jsonl holds (0: the initial evaluation)."""
    path = RunLayout(Path(run_dir)).metrics
    if not path.is_file():
        return None
    last = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip().endswith("}"):
            try:
                last = int(json.loads(line)["round"])
            except (ValueError, KeyError, TypeError):
                continue
    return last


def waiting_for(*, state: str, rounds: int, done: int | None, num_sites: int,
                min_fit_sites: int, connected: list[str]) -> str | None:
    """What the next round waits for, in words; None when nothing is waited for.

    A round starts once `federation.num_sites` sites are connected (the strategy's
    min_available_clients) and aggregates once `federation.min_fit_sites` valid updates came in.
    """
    if state in FINAL_STATES or state == "starting":
        return None
    nxt = 1 if done is None else done + 1
    if nxt > rounds:
        return None
    have = len(connected)
    if have < num_sites:
        return (f"round {nxt} waits for federation.num_sites = {num_sites} connected sites, "
                f"{have} connected" + (f" ({', '.join(connected)})" if connected else ""))
    return (f"round {nxt} of {rounds} in progress: {have} sites connected; it aggregates once "
            f"federation.min_fit_sites = {min_fit_sites} valid update"
            + ("s have" if min_fit_sites != 1 else " has") + " come in")


def control_nodes(coord: Coordinator) -> list[SiteSeen]:
    """Every site the SuperLink knows, by the name its key was registered under."""
    from flwr.common.constant import HEARTBEAT_PATIENCE
    from flwr.proto.control_pb2 import ListNodesRequest

    client = coord._control_client()
    try:
        res = client.ListNodes(ListNodesRequest())
    finally:
        client.close()
    out = []
    for n in res.nodes_info:
        name = n.name or (n.owner_name if n.owner_name not in ("", "none") else "")
        seen = (n.online_until - HEARTBEAT_PATIENCE * n.heartbeat_interval
                if n.online_until else None)
        out.append(SiteSeen(name or f"node {n.node_id}", int(n.node_id), n.status, seen))
    return sorted(out, key=lambda s: (len(s.site_id), s.site_id))


class StatusFile:
    """Writes `<run_dir>/status.json` for one run of `fedtune server`; never raises (a status
    that cannot be written must not stop a run)."""

    def __init__(self, run_dir: Path, run_id: str, cfg: RunConfig, expected: list[str],
                 nodes: Callable[[], list[SiteSeen]] | None = None) -> None:
        self.path = status_path(run_dir)
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self.rounds = cfg.federation.rounds
        self.num_sites = cfg.federation.num_sites
        self.min_fit_sites = cfg.federation.min_fit_sites
        self.expected = sorted(expected, key=lambda s: (len(s), s))
        self.nodes = nodes
        self.started_at = time.time()
        self.flower_run_id: int | None = None
        self._seen: list[SiteSeen] = []

    def update(self, flower_status: str | None = None, *, state: str | None = None) -> None:
        """Rewrite the file: `state` (starting, running, finished, interrupted, stopped) or,
        when not given, the one Flower's run status implies; the sites as the SuperLink lists
        them now (the last list when it cannot be asked)."""
        try:
            state = state or _state_of(flower_status)
            if self.nodes is not None and state in ("running", "finished"):
                try:
                    self._seen = self.nodes()
                except Exception:  # noqa: BLE001 - the Control API may be briefly unreachable
                    pass
            done = last_round(self.run_dir)
            connected = [s.site_id for s in self._seen if s.connected]
            record = {
                "format": FORMAT,
                "run_id": self.run_id,
                "flower_run_id": self.flower_run_id,
                "state": state,
                "flower_status": flower_status,
                "rounds": self.rounds,
                "last_round": done,
                "num_sites": self.num_sites,
                "min_fit_sites": self.min_fit_sites,
                "expected_sites": self.expected,
                "sites": [asdict(s) | {"connected": s.connected} for s in self._seen],
                "waiting_for": waiting_for(state=state, rounds=self.rounds, done=done,
                                           num_sites=self.num_sites,
                                           min_fit_sites=self.min_fit_sites,
                                           connected=connected),
                "coordinator_pid": os.getpid(),
                "started_at": self.started_at,
                "updated_at": time.time(),
            }
            atomic_write_text(self.path, json.dumps(record, indent=1) + "\n")
        except Exception:  # noqa: BLE001 - best effort, see the class docstring
            pass

    def submitted(self, flower_run_id: int) -> None:
        """The run is submitted to the SuperLink: from now on the sites can be asked for."""
        self.flower_run_id = flower_run_id
        self.update("pending")

    def close(self, flower_status: str) -> None:
        """The coordinator stops: finished, interrupted, or stopped (an error)."""
        state = ("finished" if flower_status.startswith("finished")
                 else "interrupted" if flower_status == "interrupted" else "stopped")
        self.update(flower_status, state=state)


def _state_of(flower_status: str | None) -> str:
    if not flower_status:
        return "starting"
    if flower_status.startswith("finished"):
        return "finished"
    return "running"
