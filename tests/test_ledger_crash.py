"""Crash safety: a real site process (FedtuneClient.fit: real Opacus DP-SGD on MiniLM + LoRA) is
SIGKILLed in the middle of its round. Its ledger must already show at least the epsilon that the
DP steps it actually took spent, and a restarted site must count the interrupted round."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.optim.optimizer import register_optimizer_step_post_hook

from fedtune.client.client_app import FedtuneClient, SiteSpec
from fedtune.common.config import config_to_toml, load_config
from fedtune.common.data import write_jsonl
from fedtune.common.demo_data import classification_demo
from fedtune.common.ledger import PrivacyLedger
from fedtune.common.payload import payload_digest
from fedtune.common.privacy import epsilon

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SIGMA, DELTA, BATCH, RECORDS, STEPS = 1.0, 1e-3, 4, 60, 400

# The site process: the real client's fit for round 1. A global PyTorch optimizer hook writes
# (and fsyncs) one line per optimizer step, so the test knows how many DP steps really ran.
CHILD = """
import os, sys
from pathlib import Path
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from fedtune.client.client_app import FedtuneClient, SiteSpec
from fedtune.common.config import load_config
from fedtune.common.lora import get_adapter
from fedtune.common.model_cache import get_runtime
from fedtune.common.tasks import num_labels, resolve_task

cfg = load_config(sys.argv[1])
state, data, steps_file, n = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
log = open(steps_file, "a")
def one_step(optimizer, args, kwargs):
    log.write("step\\n"); log.flush(); os.fsync(log.fileno())
register_optimizer_step_post_hook(one_step)
task = resolve_task(cfg)
rt = get_runtime(cfg, task, num_labels(cfg, task))
FedtuneClient(SiteSpec("site-0", data, state), cfg).fit(
    get_adapter(rt.model),
    {"run_id": "crash-run", "server_round": 1, "local_steps": n, "num_rounds": 2},
)
print("FINISHED", flush=True)
"""


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture
def site(tmp_path: Path):
    rows = classification_demo(RECORDS, 3)
    data = tmp_path / "site-0" / "data" / "train.jsonl"
    write_jsonl(data, rows)
    labels = sorted({r["label"] for r in rows})
    cfg = load_config(None, [
        "model.name=all-minilm-l6-v2", "model.max_length=32", f"train.batch_size={BATCH}",
        "train.threads=1", f"dp.noise_multiplier={SIGMA}", "dp.target_epsilon=1000",
        f"dp.delta={DELTA}", f"data.labels={labels!r}".replace("'", '"'),
    ])
    cfg_path = tmp_path / "site.toml"
    cfg_path.write_text(config_to_toml(cfg))
    return cfg, cfg_path, data, tmp_path / "site-0" / "state"


def test_sigkill_mid_round_never_under_counts(site, tmp_path: Path):
    cfg, cfg_path, data, state = site
    steps_file = tmp_path / "steps.log"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cfg_path), str(state), str(data), str(steps_file),
         str(STEPS)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 300
        while _lines(steps_file) < 3:  # training is under way
            assert child.poll() is None, f"site process exited early:\n{child.stdout.read()}"
            assert time.time() < deadline, "site process never started training"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    out = child.stdout.read()
    assert child.returncode == -signal.SIGKILL and "FINISHED" not in out

    taken = _lines(steps_file)
    assert 3 <= taken < STEPS  # killed mid-round
    ledger = PrivacyLedger(state, "site-0")
    (row,) = ledger.rows("crash-run")
    q = row.sample_rate
    assert q == pytest.approx(1 / (RECORDS // BATCH)) and row.noise_multiplier == SIGMA
    # Spent: the steps that ran, plus the one that may have been in flight when killed.
    spent_rdp = epsilon([(SIGMA, q, taken + 1)], DELTA, "rdp")
    spent_prv = epsilon([(SIGMA, q, taken + 1)], DELTA, "prv")
    assert row.epsilon_run_rdp >= spent_rdp and row.epsilon_run_prv >= spent_prv
    assert row.epsilon_run_rdp == pytest.approx(epsilon([(SIGMA, q, STEPS)], DELTA, "rdp"))
    assert ledger.payloads("crash-run") == []  # the update never left the site
    print(f"killed after {taken}/{STEPS} DP steps: ledger eps RDP {row.epsilon_run_rdp:.4f} "
          f">= spent {spent_rdp:.4f}; PRV {row.epsilon_run_prv:.4f} >= {spent_prv:.4f}")

    # The site restarts (new process state: a fresh client object) and is asked for round 2.
    counted: list[int] = []
    hook = register_optimizer_step_post_hook(
        lambda *_: counted.append(1))
    try:
        params = _global_adapter(cfg)
        sent_arrays, n, metrics = FedtuneClient(SiteSpec("site-0", data, state), cfg).fit(
            params, {"run_id": "crash-run", "server_round": 2, "local_steps": 2,
                     "num_rounds": 2})
    finally:
        hook.remove()
    assert len(counted) == 2  # the hook counts exactly one line per DP step
    assert n == RECORDS and metrics["status"] == "ok"
    # The interrupted round still counts: round 2's epsilon composes both rounds.
    both = epsilon([(SIGMA, q, STEPS + 2)], DELTA, "rdp")
    assert metrics["epsilon"] == pytest.approx(both)
    assert [r.round for r in ledger.rows("crash-run")] == [1, 2]
    (sent,) = ledger.payloads("crash-run")
    # The hash stays in the ledger (not sent): it is the hash of the update that was returned.
    assert "payload_sha256" not in metrics
    assert sent.round == 2 and sent.sha256 == payload_digest(sent_arrays).sha256


def _global_adapter(cfg):
    from fedtune.common.lora import get_adapter
    from fedtune.common.model_cache import get_runtime
    from fedtune.common.tasks import num_labels, resolve_task

    task = resolve_task(cfg)
    return get_adapter(get_runtime(cfg, task, num_labels(cfg, task)).model)
