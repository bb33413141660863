"""Did the run train at all? A run whose rounds all finished can still have trained nothing: every
site refused the run, declined for lack of budget, or failed. `fedtune simulate` and `fedtune
server` then exit non-zero with this module's message (the cause per site) instead of a summary
of an adapter that never moved.

Reads the round records of metrics.jsonl (server/recorder.py): `sites[]` holds each site that
replied, by name, with its status and, when it did not train, its reason (the privacy gate's
refusal or budget decline, a site policy's refusal). A site that never replied (crashed, ran out
of memory, killed, timed out) has no entry: Flower reports such failures without the site's
name, so the message says so and points to the log.
"""

from __future__ import annotations

NO_REPLY = ("no reply in any round: it failed before replying (an exception, out of memory, "
            "killed) or timed out; Flower reports such a failure without the site's name, see "
            "the log")


# A site that failed without replying (its worker died): the error text carries the tag, its
# name and the cause, so the round record and the final message can name it.
SITE_FAILED_TAG = "fedtune-site-failed"


def site_failure_message(site_id: str, cause: str) -> str:
    return f"{SITE_FAILED_TAG} [{site_id}] {cause}"


def parse_site_failure(text: str) -> tuple[str, str] | None:
    """(site_id, cause) from an error text made by `site_failure_message`, else None."""
    _, tag, rest = str(text).partition(SITE_FAILED_TAG + " [")
    site_id, sep, cause = rest.partition("] ")
    if not tag or not sep:
        return None
    return site_id, cause.removesuffix("'>").strip()


def _order(site_id: str) -> tuple[int, str]:
    return len(site_id), site_id


def training_failure(metrics: list[dict], min_fit_sites: int = 1,
                     expected_sites: list[str] | None = None) -> str | None:
    """None if at least `min_fit_sites` sites (at least one) trained in some round; otherwise
    what went wrong, one line per site. Rounds are the records with round > 0; a run with no
    such record is not judged here (the callers report a run that stopped early)."""
    rounds = [m for m in metrics if m.get("round", 0) > 0]
    if not rounds:
        return None
    need = max(1, min_fit_sites)
    trained = [sum(1 for s in m.get("sites") or [] if s.get("status") == "ok") for m in rounds]
    if max(trained) >= need:
        return None
    causes: dict[str, list[str]] = {}
    for m in rounds:
        for s in m.get("sites") or []:
            sid = str(s.get("site_id", "?"))
            status = s.get("status") or "ok"
            what = ("trained" if status == "ok"
                    else f"{status}: {s.get('reason') or 'no reason given'}")
            if what not in causes.setdefault(sid, []):
                causes[sid].append(what)
        dropped = (m.get("participation") or {}).get("dropped") or {}
        for key, reason in dropped.items():  # failed without a reply: a dead worker, a timeout
            named = parse_site_failure(str(reason))
            sid, what = (named[0], f"failed: {named[1]}") if named else (str(key),
                                                                         f"dropped: {reason}")
            if what not in causes.setdefault(sid, []):
                causes[sid].append(what)
    for sid in expected_sites or []:
        causes.setdefault(sid, [NO_REPLY])
    n = len(rounds)
    head = (f"no site trained in any of the {n} round(s)" if max(trained) == 0
            else f"fewer than federation.min_fit_sites = {need} sites trained in every one of "
                 f"the {n} round(s) (at most {max(trained)})")
    lines = [f"  {sid}: " + "; then ".join(causes[sid]) for sid in sorted(causes, key=_order)]
    return (f"{head}; the global adapter was not trained. Cause per site:\n"
            + "\n".join(lines or ["  (no site replied in any round; see the log)"]))
