"""Keep the console readable: drop library chatter that says nothing about the user's run."""

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


def quiet_libraries() -> None:
    logging.getLogger("flwr").addFilter(_DropFlowerNoise())
    for h in logging.getLogger("flwr").handlers:
        h.addFilter(_DropFlowerNoise())
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*secure RNG.*")
    logging.getLogger("transformers").setLevel(logging.ERROR)
