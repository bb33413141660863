"""The coordinator's durable state (server/state.py) and atomic checkpoints (common/lora.py):
what `fedtune server --resume` continues from, and what a kill in the middle of a write leaves.
Writers are real processes killed with SIGKILL; strategies are fedtune's real Flower ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedtune.server.state import (
    STATE_FILE,
    ResumeError,
    ServerState,
    load_state,
    prepare_resume,
    recover_adapter_dir,
    restore_strategy_state,
    save_state,
    state_after_round,
    strategy_state,
)
from fedtune.server.strategy import FedAdam, FedAvgM

REPO = Path(__file__).resolve().parents[1]
GLOBAL = [np.full((6, 4), 0.25, np.float32), np.zeros(3, np.float32)]


def _replies(seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
        [rng.normal(size=g.shape).astype(np.float32) * 0.01 for g in GLOBAL]), n, {}))
        for n in (5, 9)]


def _fedadam(initial: list[np.ndarray]) -> FedAdam:
    s = FedAdam(initial_parameters=ndarrays_to_parameters(initial), eta=0.05, eta_l=0.1,
                accept_failures=True)
    s.initialize_parameters(client_manager=None)
    return s


def _fedavgm(initial: list[np.ndarray]) -> FedAvgM:
    s = FedAvgM(initial_parameters=ndarrays_to_parameters(initial), server_momentum=0.9,
                accept_failures=True)
    s.initialize_parameters(client_manager=None)
    return s


@pytest.mark.parametrize("build", [_fedadam, _fedavgm], ids=["fedadam", "fedavgm"])
def test_resumed_server_optimizer_continues_exactly_like_an_uninterrupted_one(tmp_path: Path,
                                                                              build):
    """Optimizer moments (FedAdam) and the momentum buffer (FedAvgM) survive a restart: round 3
    after a resume equals round 3 without."""
    straight = build(GLOBAL)
    for rnd in (1, 2, 3):
        params, _ = straight.aggregate_fit(rnd, _replies(rnd), [])
    expected = parameters_to_ndarrays(params)

    first = build(GLOBAL)
    for rnd in (1, 2):
        first.aggregate_fit(rnd, _replies(rnd), [])
    saved = strategy_state(first)
    assert {"m_t", "v_t"} <= set(saved) if build is _fedadam else "momentum_vector" in saved
    save_state(tmp_path, ServerState("run-x", 2, 2, 3, saved))
    adapter_after_2 = [a.copy() for a in first.global_adapter]
    del first

    state = load_state(tmp_path)
    assert state is not None and (state.run_id, state.round, state.num_rounds) == ("run-x", 2, 3)
    resumed = build(adapter_after_2)  # what the ServerApp does with the checkpoint
    restore_strategy_state(resumed, state.strategy)
    params, _ = resumed.aggregate_fit(3, _replies(3), [])
    for a, b in zip(parameters_to_ndarrays(params), expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_state_of_dp_wrappers_round_trips(tmp_path: Path):
    """The site-level DP accountant and the adaptive clipping norm live on the wrapper chain."""
    from fedtune.common.config import load_config
    from fedtune.server.strategy import FedAvg
    from fedtune.server.strategy.central_dp import with_central_dp

    cfg = load_config(None, ["central_dp.enabled=true", "central_dp.clipping=adaptive",
                             "central_dp.noise_multiplier=0.1"])

    def build():
        inner = FedAvg(initial_parameters=ndarrays_to_parameters(GLOBAL))
        return with_central_dp(inner, cfg)

    s = build()
    s.releases = [(1.2, 1.0, 1), (1.1, 1.0, 1)]
    s.clipping_norm = 0.37
    save_state(tmp_path, ServerState("r", 2, 2, 5, strategy_state(s)))
    fresh = build()
    restore_strategy_state(fresh, load_state(tmp_path).strategy)
    assert fresh.releases == [(1.2, 1.0, 1), (1.1, 1.0, 1)] and fresh.clipping_norm == 0.37


def _write_run(run_dir: Path, rounds_done: int, extra_round: bool) -> None:
    """A run directory as a coordinator killed during round `rounds_done + 1` leaves it."""
    (run_dir / "checkpoints").mkdir(parents=True)
    lines = [json.dumps({"round": r, "run_id": "r"}) for r in range(rounds_done + 1)]
    if extra_round:  # the interrupted round got as far as its checkpoint and metrics line
        lines.append(json.dumps({"round": rounds_done + 1, "run_id": "r"}))
        (run_dir / "checkpoints" / f"round-{rounds_done + 1:04d}").mkdir()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"round": 9, "tor')
    (run_dir / "checkpoints" / ".round-0009-abc").mkdir()  # save_adapter's temporary dir


def test_prepare_resume_undoes_the_interrupted_round(tmp_path: Path):
    from fedtune.common.config import load_config
    from fedtune.common.lora import get_adapter, save_adapter, set_adapter
    from fedtune.common.model_cache import get_runtime

    cfg = load_config(None, ["model.name=all-minilm-l6-v2", 'data.labels=["a", "b"]'])
    model = get_runtime(cfg, "classification", 2).model
    initial = get_adapter(model)
    trained = [a + 0.01 * (i + 1) for i, a in enumerate(initial)]
    run = tmp_path / "run"
    _write_run(run, rounds_done=1, extra_round=True)
    set_adapter(model, trained)
    save_adapter(model, run / "checkpoints" / "round-0001")
    set_adapter(model, initial)
    save_state(run, state_after_round(run, "r", 1, 3, SimpleNamespace(), None))

    point = prepare_resume(run, "r", model)  # loads the checkpoint into the (cached) model
    set_adapter(model, initial)
    assert point is not None and point.next_round == 2 and point.state.adapter_round == 1
    for a, b in zip(point.adapter, trained, strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-0001"]
    assert [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] \
        == [0, 1]
    with pytest.raises(ResumeError, match="belongs to run 'r'"):
        prepare_resume(run, "another-run", model)

    # Killed before the initial evaluation was even recorded: start over, cleanly.
    run0 = tmp_path / "run0"
    _write_run(run0, rounds_done=0, extra_round=False)
    assert prepare_resume(run0, "r", model) is None
    assert (run0 / "metrics.jsonl").read_text() == ""


# ---------------------------------------------------------------------------------------------
# Kills in the middle of writes.

STATE_WRITER = """
import sys, numpy as np
from fedtune.server.state import ServerState, save_state
run_dir = sys.argv[1]
big = [np.full((512, 1024), float(k), np.float32) for k in range(4)]  # 8 MiB per state
r = 0
while True:
    r += 1
    save_state(run_dir, ServerState("run-x", r, r, 10**6, {"m_t": [b + r for b in big]}))
    print(r, flush=True)
"""


def test_kill_during_state_writes_leaves_a_previous_good_state(tmp_path: Path):
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", STATE_WRITER, str(tmp_path)], cwd=REPO,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        for _ in range(2 + attempt):  # let it complete a few writes, then kill it mid-write
            proc.stdout.readline()
        time.sleep(0.01 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        state = load_state(tmp_path)  # never a torn file
        assert state is not None and state.round >= 2 + attempt - 1
        np.testing.assert_array_equal(state.strategy["m_t"][3], 3.0 + state.round)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != STATE_FILE]
    assert all(p.startswith(f".{STATE_FILE}.") for p in leftovers)  # at most temp files


ADAPTER_WRITER = """
import sys
from pathlib import Path
from fedtune.common.config import load_config
from fedtune.common.lora import get_adapter, save_adapter, set_adapter
from fedtune.common.model_cache import get_runtime
cfg = load_config(None, ["model.name=all-minilm-l6-v2", 'data.labels=["a", "b"]'])
model = get_runtime(cfg, "classification", 2).model
base = get_adapter(model)
k = 0
while True:
    k += 1
    set_adapter(model, [a + k for a in base])
    save_adapter(model, Path(sys.argv[1]) / "adapter")
    print(k, flush=True)
"""


def _adapter_value(directory: Path) -> float:
    from safetensors.numpy import load_file

    sd = load_file(directory / "adapter_model.safetensors")
    lora_b = [v for k, v in sd.items() if "lora_B" in k]
    assert lora_b and all(np.all(b == b.flat[0]) for b in lora_b)  # one complete save, not torn
    return float(lora_b[0].flat[0])


def test_kill_during_checkpoint_writes_leaves_a_loadable_adapter(tmp_path: Path):
    proc = subprocess.Popen([sys.executable, "-c", ADAPTER_WRITER, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.stdout is not None
    done = [int(proc.stdout.readline()) for _ in range(3)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    recover_adapter_dir(tmp_path / "adapter")
    value = _adapter_value(tmp_path / "adapter")  # LoRA B starts at 0: B = k after save k
    assert value >= done[-1]


def test_crash_between_the_two_renames_is_recovered(tmp_path: Path):
    """save_adapter swaps `adapter/` for the new one with two renames; a kill between them
    leaves only `.adapter.old`. Resuming (and the next save) put the previous one back."""
    from fedtune.common.config import load_config
    from fedtune.common.lora import get_adapter, save_adapter, set_adapter
    from fedtune.common.model_cache import get_runtime

    cfg = load_config(None, ["model.name=all-minilm-l6-v2", 'data.labels=["a", "b"]'])
    model = get_runtime(cfg, "classification", 2).model
    base = get_adapter(model)
    # Explicit values: the per-process model may have been trained by an earlier test.
    set_adapter(model, [np.full_like(a, 1.0) for a in base])
    save_adapter(model, tmp_path / "adapter")
    os.replace(tmp_path / "adapter", tmp_path / ".adapter.old")  # the crash window
    (tmp_path / ".adapter-xyz").mkdir()  # and the new one's temporary directory
    recover_adapter_dir(tmp_path / "adapter")
    assert _adapter_value(tmp_path / "adapter") == 1.0

    os.replace(tmp_path / "adapter", tmp_path / ".adapter.old")
    set_adapter(model, [np.full_like(a, 2.0) for a in base])
    save_adapter(model, tmp_path / "adapter")  # the next save copes with the leftover too
    assert _adapter_value(tmp_path / "adapter") == 2.0
    assert not (tmp_path / ".adapter.old").exists()
    set_adapter(model, base)
