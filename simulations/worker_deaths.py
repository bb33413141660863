"""A simulated site whose Ray worker dies is named, with the cause, and its worker replaced.

Flower 1.39's RayBackend reports a dead actor (killed by Ray's memory monitor, by the kernel's OOM
killer, by a SIGKILL) only as an anonymous exception, and puts the dead actor back into its pool:
every later message handed to it fails at once, whichever site it is for. `SiteNamingRayBackend`
is the same backend with two changes on an actor's death: the message's site is named with the
cause (logged at once, and carried in the error reply, so the round record and the final "no
site trained" message name it; server/outcome.py), and the dead actor is replaced by a fresh one
so that the other sites go on training. The site's reply is an error message (as Flower's
would be), without Flower's traceback of the backend.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import ray
from flwr.app import Context, Error, Message
from flwr.common.constant import PARTITION_ID_KEY, ErrorCode
from flwr.server.superlink.fleet.vce.backend import raybackend

from fedtune.server.outcome import site_failure_message

log = logging.getLogger("flwr")  # shown while the run's Flower logs are at WARNING


def death_cause(error: BaseException) -> str:
    """What killed a Ray worker, in one line, from Ray's exception."""
    text = " ".join(str(error).split())
    # Ray's memory monitor says so; a plain SIGKILL only lists OOM among "potential causes"
    if isinstance(error, ray.exceptions.OutOfMemoryError) or re.search(
            r"memory usage threshold|due to memory pressure|running low on memory", text):
        what = "killed by Ray's memory monitor: the node ran out of memory"
    elif re.search(r"unexpectedly|unexpected system error|SIGKILL|connection error", text):
        what = ("its process ended without warning: killed (SIGKILL, e.g. by the kernel's OOM "
                "killer) or crashed")
    else:
        what = "it died"
    detail = text if len(text) <= 240 else text[:237] + "..."
    return f"its Ray worker died: {what} [{type(error).__name__}: {detail}]"


class SiteNamingRayBackend(raybackend.RayBackend):
    """Flower's RayBackend that names the site of a dead worker and replaces the worker."""

    site_of: Callable[[int], str] = staticmethod(lambda pid: f"site-{pid}")  # type: ignore[assignment]

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        """As RayBackend.process_message; a dead actor gives an error reply naming the site."""
        if self.pool is None or self.app_fn is None:
            return super().process_message(message, context)
        partition_id = int(context.node_config[PARTITION_ID_KEY])
        future = self.pool.submit(
            lambda a, a_fn, mssg, cid, state: a.run.remote(a_fn, mssg, cid, state),
            (self.app_fn, message, str(partition_id), context),
        )
        try:
            return self.pool.fetch_result_and_return_actor_to_pool(future)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.OutOfMemoryError) as e:
            self.pool._future_to_actor.pop(future, None)  # dead: not back into the pool
            self.pool.pool.append(self.pool.create_actor_fn())  # a fresh worker instead
            site = self.site_of(partition_id)
            cause = death_cause(e)
            log.error("%s: %s", site, cause)
            reply = Message(Error(code=ErrorCode.UNKNOWN, reason=site_failure_message(site, cause)),
                            reply_to=message)
            return reply, context
        except Exception:
            self.pool.add_actor_back_to_pool(future)  # as Flower does: the actor still lives
            raise


def install(site_of: Callable[[int], str]) -> None:
    """Make Flower's simulation engine build `SiteNamingRayBackend` (read by `start_vce` at
    each run), naming partition ids with `site_of`."""
    SiteNamingRayBackend.site_of = staticmethod(site_of)  # type: ignore[assignment]
    raybackend.RayBackend = SiteNamingRayBackend  # type: ignore[misc]
