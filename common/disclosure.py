"""Every value a site sends in clear, listed once.

`disclose()` filters the metrics a site replies with: a key that is not listed here never leaves
the site, so new code cannot leak a value silently. The table in docs/privacy.md and the report's
"what left each site" section are generated from `DISCLOSED` (regenerate the doc with
`python -m fedtune.common.disclosure docs/privacy.md`; a test checks it).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flwr.supercore.differential_privacy import KEY_NORM_BIT

from fedtune.common.codec import METRIC_KEY
from fedtune.common.lora import LAYOUT_METRIC

log = logging.getLogger(__name__)

Channel = Literal["reply", "metrics"]
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def redact_numbers(text: Any) -> str:
    """A reason with its numbers replaced by '#': which rule refused, not the site's values."""
    return _NUMBER.sub("#", str(text))


@dataclass(frozen=True)
class Disclosed:
    """One value that leaves a site in clear (or, for the update, protected by DP-SGD)."""

    key: str
    what: str
    why: str  # why the coordinator needs it
    when: str
    channel: Channel = "metrics"  # "reply": a field of Flower's FitRes, not a metric
    opt_in: bool = False  # sent only when the site itself says so
    coarsen: Callable[[Any], Any] | None = None  # applied at the site before sending


DISCLOSED: tuple[Disclosed, ...] = (
    Disclosed("parameters", "the adapter delta (local − global LoRA tensors); all-zero when the "
              "site declines", "the update being aggregated. Protected by the site's DP-SGD; "
              "with SecAgg+ masked so that an honest-but-curious coordinator sees only the sum",
              "every round", channel="reply"),
    Disclosed("num_examples", "the site's record count (the FedAvg weight); 1 with site-level DP; "
              "0 when it declines", "weighting the sites in the mean; 0 marks a reply that "
              "carries no update", "every round", channel="reply"),
    Disclosed("site_id", "the site's name", "naming the site in logs, refusals and the budget "
              "view (the coordinator already knows each site by its key)", "every round"),
    Disclosed("records", "the number of records at the site", "the budget view and the "
              "round's loss weighting; the same number as num_examples", "every round in which "
              "the site counted its data"),
    Disclosed("status", "ok, refused or budget_exhausted", "telling a refusal from a failure",
              "every round"),
    Disclosed("reason", "why the site refused or declined, numbers redacted (full text in the "
              "site's ledger and log)", "telling the coordinator which setting to change",
              "refused or declined rounds", coarsen=redact_numbers),
    Disclosed("epsilon", "ε this run has spent at the site so far, by its accountant",
              "the coordinator's budget view; a function of σ, q, steps and δ, so with σ it "
              "reveals q = 1/⌈units/batch⌉: at person level, roughly how many persons the site "
              "has (at record level the record count is sent anyway)", "DP rounds"),
    Disclosed("delta", "the δ of that ε", "reading ε", "DP rounds"),
    Disclosed("noise_multiplier", "σ, the noise multiplier the site plans for the run",
              "the coordinator's view of each site's noise (utility)", "DP rounds"),
    Disclosed("accountant", "rdp or prv: which accountant computed ε", "reading ε",
              "trained DP rounds"),
    Disclosed(LAYOUT_METRIC, "digest of the adapter's tensor names and shapes",
              "rejecting an update from a differently configured model", "trained rounds"),
    Disclosed("lora_a_digest", "digest of the site's frozen LoRA A matrices",
              "FFA-LoRA: every site must share the server's A", "trained rounds, FFA-LoRA only"),
    Disclosed(METRIC_KEY, "fp16 or int8: how the delta is encoded", "decoding the delta",
              "trained rounds with federation.update_encoding ≠ fp32"),
    Disclosed(KEY_NORM_BIT, "whether the site clipped its update (site-level DP)",
              "Flower's adaptive clipping sets the next clipping norm from these bits (noised "
              "in the count)", "rounds in which the server asks for client-side clipping"),
    Disclosed("train_loss", "the site's mean training loss over the round's batches",
              "loss curves; NOT covered by the DP guarantee", "trained rounds, only if the site "
              "opts in (site.toml [disclosure] train_loss = true; simulation: "
              "federation.report_train_loss)", opt_in=True),
)

# What sites sent before and no longer send, and why: kept in the ledger or log at the site.
NOT_SENT: dict[str, str] = {
    "examples_seen": "the Poisson batch sizes: they reveal the secret sample",
    "train_seconds": "timing depends on which records were sampled",
    "fit_seconds": "timing depends on which records were sampled",
    "epsilon_total": "the site's spend over other runs, not the coordinator's business",
    "epsilon_round": "derivable from σ, q and steps; not needed",
    "epsilon_rdp": "both accountants' ε stay in the ledger; `epsilon` is the enforced one",
    "epsilon_prv": "both accountants' ε stay in the ledger; `epsilon` is the enforced one",
    "sample_rate": "q = 1/⌈records/batch⌉, not needed",
    "payload_bytes": "the server measures what it receives",
    "payload_sha256": "a fingerprint of the single update (SecAgg+ hides it); kept in the ledger, "
                      "and the server hashes what it receives itself",
}

METRIC_KEYS: frozenset[str] = frozenset(d.key for d in DISCLOSED if d.channel == "metrics")
ALL_KEYS: tuple[str, ...] = tuple(d.key for d in DISCLOSED)
OPT_IN_KEYS: frozenset[str] = frozenset(d.key for d in DISCLOSED if d.opt_in)


def disclose(metrics: Mapping[str, Any], opted_in: frozenset[str] = frozenset()) -> dict:
    """The part of `metrics` a site may send: listed keys only; opt-in keys only if opted in."""
    out, dropped = {}, []
    by_key = {d.key: d for d in DISCLOSED if d.channel == "metrics"}
    for key, value in metrics.items():
        d = by_key.get(key)
        if d is None or (d.opt_in and key not in opted_in):
            dropped.append(key)
            continue
        out[key] = d.coarsen(value) if d.coarsen else value
    if dropped:
        log.debug("not sent (not in common/disclosure.py or not opted in): %s", sorted(dropped))
    return out


def as_rows() -> list[dict[str, Any]]:
    """The list as plain dicts (the report's "what left each site")."""
    return [{"key": d.key, "what": d.what, "why": d.why, "when": d.when, "channel": d.channel,
             "opt_in": d.opt_in} for d in DISCLOSED]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The docs table (docs/privacy.md, between the disclosure markers)."""
    lines = ["| value | what | why the coordinator needs it | when sent |", "|---|---|---|---|"]
    for d in DISCLOSED:
        name = f"`{d.key}`" + (" (FitRes)" if d.channel == "reply" else "")
        lines.append(f"| {name} | {_cell(d.what)} | {_cell(d.why)} | {_cell(d.when)} |")
    lines += ["", "No longer sent (the site's ledger keeps ε by both accountants, over all "
              "runs, and each update's size and SHA-256):", "",
              "| value | why not |", "|---|---|"]
    lines += [f"| `{k}` | {_cell(v)} |" for k, v in NOT_SENT.items()]
    return "\n".join(lines)


BEGIN, END = "<!-- disclosure table: generated by common/disclosure.py -->", "<!-- /disclosure -->"


def doc_with_table(text: str) -> str:
    """`text` with the part between BEGIN and END replaced by `markdown_table()`."""
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{markdown_table()}\n{END}{tail}"


if __name__ == "__main__":  # python -m fedtune.common.disclosure docs/privacy.md
    path = Path(sys.argv[1])
    path.write_text(doc_with_table(path.read_text(encoding="utf-8")), encoding="utf-8")
