"""Keep the console readable: drop library chatter that says nothing about the user's run, and
show each of Flower's log lines once, in colour only on a terminal."""

from __future__ import annotations

import logging
import warnings

# Flower 1.39 deprecates run_simulation in favour of `flwr run`; it is still the supported
# in-process engine in 1.39 and the one fedtune uses on purpose.
_DROP = ("DEPRECATED FEATURE", "This is a deprecated feature", "run_simulation")


class _DropFlowerNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(s in msg for s in _DROP)


def _is_tty(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def plain_flower_console() -> None:
    """Each Flower log line once, coloured only when it goes to a terminal.

    Opacus calls `logging.basicConfig` when imported, giving the root logger a handler; Flower's
    logger propagates to the root, so each of its lines was printed twice (Flower's coloured
    line, then the root's plain one). Flower's own handler alone remains; its ANSI colour codes
    are kept for a terminal only, never for a redirected stream (a file, journald, a pipe)."""
    from flwr.common.logger import ConsoleHandler

    flwr = logging.getLogger("flwr")
    flwr.propagate = False
    for h in flwr.handlers:
        if isinstance(h, ConsoleHandler):
            h.colored = _is_tty(h)


def quiet_libraries() -> None:
    plain_flower_console()
    logging.getLogger("flwr").addFilter(_DropFlowerNoise())
    for h in logging.getLogger("flwr").handlers:
        h.addFilter(_DropFlowerNoise())
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*secure RNG.*")
    logging.getLogger("transformers").setLevel(logging.ERROR)
