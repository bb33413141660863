"""Who took part in a round, by site name, and why the others did not.

A round's record in metrics.jsonl (`participation`) and the coordinator's round line name each
site that trained, declined (its budget), refused (its policy) or dropped out (died, timed out).
The sites that replied name themselves in their metrics (`sites[]`); a site that dropped out
sends nothing, so the ServerApp watches the messages it sends (`ParticipationGrid`) and names
the nodes that never answered, or answered with an error, through the node id -> site name
table: the coordinator's (the names the site keys were registered under, passed with the run
config) and the one learned from earlier replies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fedtune.server.outcome import parse_site_failure

if TYPE_CHECKING:
    from flwr.app import Message

NO_REPLY = "no reply (the site died, lost its link, or timed out)"


def _short(reason: str, limit: int = 200) -> str:
    """One line of an error text (Flower's can be long)."""
    line = " ".join(str(reason).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class RoundParticipation:
    """Per round: the nodes messaged and the first failure of each (no reply, an error)."""

    def __init__(self, node_names: Mapping[int, str] | None = None) -> None:
        self.names: dict[int, str] = {int(k): str(v) for k, v in (node_names or {}).items()}
        self.round = 0  # set when a round is configured (RunRecorder.fit_config)
        self._contacted: dict[int, dict[int, str | None]] = {}

    def learn(self, names: Mapping[int, str]) -> None:
        """Node ids of sites that replied (their metrics carry the name)."""
        self.names.update({int(k): str(v) for k, v in names.items() if v and v != "?"})

    def name(self, node_id: int) -> str:
        return self.names.get(int(node_id), f"node {node_id}")

    def sent(self, node_ids: Iterable[int]) -> None:
        nodes = self._contacted.setdefault(self.round, {})
        for nid in node_ids:
            nodes.setdefault(int(nid), None)

    def failed(self, node_id: int, reason: str) -> None:
        nodes = self._contacted.setdefault(self.round, {})
        if nodes.get(int(node_id)) is None:  # the first failure is the cause
            nodes[int(node_id)] = _short(reason)

    def for_round(self, server_round: int, sites: list[dict]) -> dict[str, Any]:
        """{"trained": [...], "declined": {site: reason}, "refused": {site: reason},
        "dropped": {site: reason}} for one round, by site name; forgets the round."""
        contacted = self._contacted.pop(server_round, {})
        out: dict[str, Any] = {"trained": [], "declined": {}, "refused": {}, "dropped": {}}
        seen: set[str] = set()
        for s in sites:
            sid = str(s.get("site_id", "?"))
            seen.add(sid)
            status = s.get("status") or "ok"
            if status == "ok":
                out["trained"].append(sid)
            elif status == "refused":
                out["refused"][sid] = str(s.get("reason") or "refused")
            else:
                out["declined"][sid] = f"{status}: {s.get('reason') or 'no reason given'}"
        for nid, why in contacted.items():
            sid = self.name(nid)
            tagged = parse_site_failure(why) if why else None  # a simulated worker's death
            if tagged and sid.startswith("node "):
                sid = tagged[0]  # the reason keeps its tag: server/outcome.py reads it
            if sid not in seen:
                out["dropped"][sid] = why or NO_REPLY
        out["trained"].sort(key=lambda x: (len(x), x))
        return out


class ParticipationGrid:
    """A Grid that tells a `RoundParticipation` which nodes it messaged and which of them did
    not answer (or answered with an error); everything else goes to the wrapped grid."""

    def __init__(self, grid: Any, tracker: RoundParticipation) -> None:
        self._grid = grid
        self.tracker = tracker

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        targets = [m.metadata.dst_node_id for m in sent]
        self.tracker.sent(targets)
        replies = list(self._grid.send_and_receive(sent, timeout=timeout))
        # The grid set each message's id when it pushed it. An error the SuperLink makes for a
        # node (e.g. its heartbeat lapsed) comes from the SuperLink's own node id: the message
        # it answers names the node.
        to_node = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        answered = set()
        for r in replies:
            nid = r.metadata.src_node_id
            if nid not in targets:
                nid = to_node.get(r.metadata.reply_to_message_id, nid)
            answered.add(nid)
            if r.has_error() and nid in targets:
                self.tracker.failed(nid, r.error.reason or f"error code {r.error.code}")
        limit = timeout if timeout is not None else getattr(self._grid, "timeout", None)
        waited = f" within {limit:g} s" if limit else ""
        for nid in targets:
            if nid not in answered:
                self.tracker.failed(nid, f"no reply{waited} (the site died, lost its link, "
                                         "or timed out)")
        return replies

    def __getattr__(self, name: str) -> Any:  # everything else: the real grid
        return getattr(self._grid, name)


def describe_participation(p: Mapping[str, Any] | None) -> str:
    """The round line's part on the sites that did not train: "dropped: site-2 (no reply ...);
    declined: site-1 (budget_exhausted: ...)"; empty when every site trained."""
    if not p:
        return ""
    parts = []
    for key in ("dropped", "declined", "refused"):
        items = p.get(key) or {}
        if items:
            parts.append(f"{key}: " + ", ".join(f"{k} ({v})" for k, v in sorted(items.items())))
    return "; ".join(parts)
