"""Divergence detection during a run, from what the server already has: the held-out loss it
evaluates and the aggregated adapter.

A run diverges when its held-out loss rises far above where it started (more than
LOSS_FACTOR x the round-0 loss and at least MIN_RISE nats above it) or when the loss or the
global adapter stops being finite. The usual cause is a step size too large for the optimizer,
made worse under DP-SGD, whose Gaussian noise moves the weights in proportion to the step size.
The finding goes into the round's metrics.jsonl line (`divergence`) and, the first time, into
a console warning with the keys to change; the run itself goes on.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from flwr.common import NDArrays

from fedtune.common.config import RunConfig
from fedtune.common.tasks import resolve_task

LOSS_FACTOR = 2.0  # held-out loss above 2x its start...
MIN_RISE = 0.5  # ...and at least 0.5 nats above it (a near-zero start loss is not an alarm)
log = logging.getLogger("fedtune.server")


class DivergenceWatch:
    """Compares each round's held-out loss with round 0's; see the module docstring."""

    def __init__(self, cfg: RunConfig, metrics_path: Path | None = None, *,
                 log_warning: bool = True) -> None:
        """`metrics_path`: a resumed run's metrics.jsonl, whose round 0 is the start.
        `log_warning`: also log the first finding (off where a progress display shows it)."""
        self.cfg = cfg
        self.log_warning = log_warning
        self.start_loss: float | None = None
        self.reported = False
        if metrics_path is not None and metrics_path.is_file():
            for line in metrics_path.read_text().splitlines():
                record = json.loads(line) if line.strip() else {}
                if record.get("round") == 0 and "eval" in record:
                    self.start_loss = float(record["eval"]["loss"])
                self.reported = self.reported or "divergence" in record

    def check(self, server_round: int, metrics: dict | None,
              adapter: NDArrays) -> dict | None:
        """The round's finding (a dict for metrics.jsonl), or None when all is well."""
        loss = None if metrics is None else float(metrics["loss"])
        if server_round == 0 and loss is not None and math.isfinite(loss):
            self.start_loss = loss
            return None
        finite = all(np.isfinite(a).all() for a in adapter)
        if not finite:
            what = "the global adapter has NaN or infinite values"
        elif loss is not None and not math.isfinite(loss):
            what = f"the held-out loss is {loss}"
        elif (loss is not None and self.start_loss is not None
              and loss > max(LOSS_FACTOR * self.start_loss, self.start_loss + MIN_RISE)):
            ratio = loss / self.start_loss if self.start_loss > 0 else math.inf
            what = (f"the held-out loss rose to {loss:.4g}, "
                    + (f"{ratio:.1f}x" if ratio < 100 else "over 100x")
                    + f" its start ({self.start_loss:.4g})")
        else:
            return None
        cause, hint = self._cause_and_hint()
        finding = {"what": what, "loss": loss, "start_loss": self.start_loss,
                   "adapter_finite": finite, "cause": cause, "hint": hint,
                   "first": not self.reported}
        if not self.reported and self.log_warning:
            log.warning("round %d: the run is diverging: %s. %s %s", server_round, what,
                        cause, hint)
        self.reported = True
        return finding

    def _cause_and_hint(self) -> tuple[str, str]:
        """The likely cause and the keys to change, worded from the run's settings."""
        t, dp, fed = self.cfg.train, self.cfg.dp, self.cfg.federation
        classification = resolve_task(self.cfg) == "classification"
        steps = f"train.lr = {t.lr:g}"
        if classification:
            steps += f", train.head_lr = {t.head_lr if t.head_lr is not None else t.lr:g}"
        cause = (f"the step size is too large for the {t.optimizer} optimizer ({steps})"
                 + (", and with DP-SGD each step also adds Gaussian noise that moves the "
                    "weights in proportion to it." if dp.enabled else "."))
        hint = f"lower train.lr (e.g. to {t.lr / 10:g})"
        if classification:
            head = t.head_lr if t.head_lr is not None else t.lr
            hint += f" and train.head_lr (e.g. to {head / 10:g})"
        if dp.enabled:
            hint += (", or reduce the noise per step (a larger train.batch_size or "
                     "dp.target_epsilon)")
        if fed.server_lr is not None:
            hint += f"; the server's step federation.server_lr = {fed.server_lr:g} adds to it"
        return cause, hint + "."
