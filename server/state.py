"""The coordinator's durable state: what `fedtune server --resume` continues from.

After every completed round (aggregated, checkpointed, evaluated, its metrics line written) the
ServerApp writes `<run_dir>/server_state.npz`, atomically (temporary file, fsync, rename, fsync of
the directory): the fedtune run id, the last completed round, which checkpoint holds the current
global adapter (`checkpoints/round-NNNN`, PEFT format; 0 = the seeded initial adapter) and the
strategy's own state (FedAdam/FedYogi moments, FedAvgM's momentum buffer, the adaptive clipping
norm and the accountant of site-level DP). A kill at any moment leaves either the previous state
or the new one.

On resume (`prepare_resume`) everything an interrupted round may have left behind is undone
first: checkpoints newer than the state, metrics lines of rounds after it, temporary directories
of an interrupted checkpoint write. The interrupted round is then run again from the start, so
no round is lost and none is counted twice at the server. (A site that trained in the interrupted
round keeps that spend in its ledger: a retried round is a second spend, see
docs/reliability.md.)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.common.atomic import atomic_write, atomic_write_text
from fedtune.common.run_layout import RunLayout

STATE_FILE = "server_state.npz"
FORMAT = 1
# Attributes that carry a strategy's memory across rounds, on the strategy or any strategy it
# wraps (`.strategy`): Flower's FedAdam/FedYogi moments and FedAvgM's momentum buffer, the
# (adaptive) clipping norm of the DP wrappers, and fedtune's site-level DP accountant
# (server/strategy/central_dp.py).
STATEFUL_ATTRS = ("m_t", "v_t", "momentum_vector", "clipping_norm", "releases")


class ResumeError(ValueError):
    """The run cannot be resumed; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Atomic files.


# ---------------------------------------------------------------------------------------------
# The state.


@dataclass
class ServerState:
    run_id: str
    round: int  # last completed round; 0: the initial evaluation is done
    adapter_round: int  # checkpoints/round-NNNN holding the global adapter; 0: initial adapter
    num_rounds: int
    strategy: dict[str, Any] = field(default_factory=dict)  # see strategy_state()
    updated_at: float = 0.0
    format: int = FORMAT


def strategy_state(strategy: object) -> dict[str, Any]:
    """{"attr" or "strategy.attr": value} for every stateful attribute along the wrapper chain."""
    out: dict[str, Any] = {}
    obj, prefix, seen = strategy, "", set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        for attr in STATEFUL_ATTRS:
            if attr in vars(obj):
                value = vars(obj)[attr]
                if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
                    value = [np.array(a, copy=True) for a in value]
                elif isinstance(value, list):
                    value = [list(x) if isinstance(x, tuple) else x for x in value]
                out[prefix + attr] = value
        obj, prefix = vars(obj).get("strategy"), prefix + "strategy."
    return out


def restore_strategy_state(strategy: object, values: dict[str, Any]) -> None:
    """Set the attributes saved by `strategy_state` on a freshly built strategy."""
    for path, value in values.items():
        *chain, attr = path.split(".")
        obj = strategy
        for name in chain:
            obj = getattr(obj, name)
        if attr == "releases":
            value = [tuple(x) for x in value]
        setattr(obj, attr, value)


def _encode(state: ServerState) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    meta = asdict(state)
    strategy_meta: dict[str, Any] = {}
    for key, value in state.strategy.items():
        if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
            for i, a in enumerate(value):
                arrays[f"strategy/{key}/{i:04d}"] = a
            strategy_meta[key] = {"arrays": len(value)}
        else:
            v = value.item() if isinstance(value, np.generic) else value
            strategy_meta[key] = {"value": v}
    meta["strategy"] = strategy_meta
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    return arrays


def save_state(run_dir: Path, state: ServerState) -> Path:
    state.updated_at = time.time()
    arrays = _encode(state)
    path = Path(run_dir) / STATE_FILE
    atomic_write(path, lambda fh: np.savez(fh, **arrays))
    return path


def load_state(run_dir: Path) -> ServerState | None:
    """The last saved state, or None when there is none. A damaged file is an error (it can
    only come from outside fedtune: its own writes are atomic)."""
    path = Path(run_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(bytes(npz["meta"]).decode("utf-8"))
            strategy: dict[str, Any] = {}
            for key, desc in meta.pop("strategy").items():
                if "arrays" in desc:
                    strategy[key] = [np.array(npz[f"strategy/{key}/{i:04d}"])
                                     for i in range(desc["arrays"])]
                else:
                    strategy[key] = desc["value"]
    except Exception as e:  # noqa: BLE001 - zip/JSON/key errors: all mean a damaged file
        raise ResumeError(f"{path} is damaged ({e}); it cannot be resumed from") from None
    if meta.get("format") != FORMAT:
        raise ResumeError(f"{path}: unknown state format {meta.get('format')!r}")
    return ServerState(**meta, strategy=strategy)


# ---------------------------------------------------------------------------------------------
# Resuming.


def checkpoint_dir(run_dir: Path, server_round: int) -> Path:
    return RunLayout(Path(run_dir)).checkpoint(server_round)


def load_checkpoint(model: Any, directory: Path) -> list[np.ndarray]:
    """The adapter tensors (transfer order) of a PEFT checkpoint, loaded into `model`."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.numpy import load_file

    from fedtune.common.lora import get_adapter

    weights = Path(directory) / "adapter_model.safetensors"
    if not weights.is_file():
        raise ResumeError(f"checkpoint {directory} is missing ({weights.name}); cannot resume")
    sd = load_file(weights)
    set_peft_model_state_dict(model, {k: torch.from_numpy(v) for k, v in sd.items()})
    return get_adapter(model)


def recover_adapter_dir(directory: Path) -> None:
    """`save_adapter` swaps directories with two renames; a crash between them leaves only
    `.NAME.old` (the previous complete adapter): put it back."""
    directory = Path(directory)
    old = directory.with_name(f".{directory.name}.old")
    if old.is_dir():
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, directory)


def _drop_incomplete(run_dir: Path, state: ServerState | None) -> None:
    """Undo what an interrupted round left: newer checkpoints, temporary dirs, metrics lines."""
    last = state.round if state else -1
    ckpts = RunLayout(Path(run_dir)).checkpoints
    if ckpts.is_dir():
        for d in ckpts.iterdir():
            if d.name.startswith("."):  # an interrupted save_adapter's temporary directory
                shutil.rmtree(d, ignore_errors=True)
            elif d.name.startswith("round-") and d.name[6:].isdigit() and int(d.name[6:]) > last:
                shutil.rmtree(d, ignore_errors=True)
    for d in Path(run_dir).glob(".adapter-*"):
        shutil.rmtree(d, ignore_errors=True)
    recover_adapter_dir(RunLayout(Path(run_dir)).adapter)
    metrics = RunLayout(Path(run_dir)).metrics
    if metrics.exists():
        kept = []
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                if line.strip() and int(json.loads(line)["round"]) <= last:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line
        atomic_write_text(metrics, "".join(x + "\n" for x in kept))


@dataclass
class ResumePoint:
    state: ServerState
    adapter: list[np.ndarray]

    @property
    def next_round(self) -> int:
        return self.state.round + 1


def prepare_resume(run_dir: Path, run_id: str, model: Any) -> ResumePoint | None:
    """Clean up after the interrupted attempt and load where it stood. None: nothing completed
    yet (not even the initial evaluation), start from the beginning."""
    state = load_state(run_dir)
    if state is not None and state.run_id != run_id:
        raise ResumeError(f"{run_dir}/{STATE_FILE} belongs to run {state.run_id!r}, not "
                          f"{run_id!r}")
    _drop_incomplete(run_dir, state)
    if state is None:
        return None
    if state.adapter_round > 0:
        adapter = load_checkpoint(model, checkpoint_dir(run_dir, state.adapter_round))
    else:
        from fedtune.common.lora import get_adapter

        adapter = get_adapter(model)  # the seeded initial adapter of a freshly built model
    return ResumePoint(state, adapter)


def state_after_round(run_dir: Path, run_id: str, server_round: int, num_rounds: int,
                      strategy: object, previous: ServerState | None) -> ServerState:
    """The state once `server_round` is complete; its checkpoint exists iff it aggregated."""
    adapter_round = previous.adapter_round if previous else 0
    if server_round > 0 and (checkpoint_dir(run_dir, server_round)
                             / "adapter_model.safetensors").is_file():
        adapter_round = server_round
    return ServerState(run_id=run_id, round=server_round, adapter_round=adapter_round,
                       num_rounds=num_rounds, strategy=strategy_state(strategy))
