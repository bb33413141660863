"""A new user's own long-text classification data, end to end on the real stack (Flower's
simulation engine on Ray, PEFT, the embedded MiniLM): a supplied eval file evaluated whole and
counted in the header, the truncation report, the divergence warning on a deliberately bad step
size, the adapter's base and model card, and `fedtune.load` in a fresh process reproducing the
run's held-out metrics exactly. Also: SIGTERM stops a run within seconds and leaves no process.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedtune.simulations.process_memory import marked_pids
from tests.conftest import REPO, run_fedtune, sets

pytestmark = pytest.mark.slow

LABELS = ["cardiology", "oncology", "neurology", "dermatology", "nephrology"]
WORDS = {
    "cardiology": "heart cardiac arrhythmia coronary valve ventricle infarction",
    "oncology": "tumor cancer chemotherapy metastasis carcinoma radiotherapy",
    "neurology": "brain seizure stroke neuron epilepsy migraine cortex",
    "dermatology": "skin rash eczema psoriasis lesion melanoma dermis",
    "nephrology": "kidney renal dialysis nephron creatinine glomerular urine",
}
FILLER = ("the patients were followed in a prospective cohort and outcomes were compared "
          "between groups using standard statistical methods with adjustment for age").split()


def _abstracts(n: int, seed: int) -> list[dict]:
    """Long 'abstracts' (about 120 words: far above max_length = 32 tokens)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        topic = WORDS[label].split()
        words = [rng.choice(topic) if rng.random() < 0.3 else rng.choice(FILLER)
                 for _ in range(120)]
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_long_text_own_data_eval_truncation_divergence_load(tmp_path: Path):
    train = _write(tmp_path / "train.jsonl", _abstracts(40, 1))
    test = _write(tmp_path / "test.jsonl", _abstracts(70, 2))  # > the old silent cap of 64
    res = run_fedtune("simulate", *sets(
        "model.name=all-minilm-l6-v2", "model.max_length=32", f"data.train={train}",
        f"data.eval={test}", "federation.num_sites=2", "federation.rounds=1",
        "train.local_steps=2", "train.batch_size=4", "dp.enabled=false",
        "train.lr=5", "train.head_lr=50",  # deliberately far too large
        f"output.dir={tmp_path}", "output.run_name=own"))
    out = res.stdout.replace("\n", " ")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_dir = tmp_path / "own"

    # The supplied eval file is evaluated whole, and the header says so.
    assert "held-out evaluation: 70 records" in out and "all of them" in out
    assert len((run_dir / "eval.jsonl").read_text().splitlines()) == 70

    # Truncation: every record is cut; the tokens lost are counted exactly.
    from transformers import AutoTokenizer

    from fedtune.common.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("all-minilm-l6-v2"))
    texts = [json.loads(x)["text"] for f in (train, test) for x in f.read_text().splitlines()]
    lengths = [len(ids) for ids in tok(texts)["input_ids"]]
    lost, total = sum(n - 32 for n in lengths if n > 32), sum(lengths)
    assert f"cuts 110 of 110 records, losing {lost:,} of {total:,} tokens" in out
    assert "set model.max_length =" in out

    # Divergence: warned in the console, recorded in metrics.jsonl, with the keys to change.
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    finding = last["divergence"]
    assert finding["first"] and finding["start_loss"] == records[0]["eval"]["loss"]
    assert "train.lr" in finding["hint"] and "train.head_lr" in finding["hint"]
    assert "the run is diverging" in out and "train.head_lr" in out
    # ... and the header warned before training: AdamW with a step size far above its range.
    assert "train.lr = 5 with AdamW" in out and "train.head_lr = 50 with AdamW" in out

    # The summary gives the peak memory of every process, the Ray site workers included.
    peak = re.search(r"peak memory \(resident\): site workers ([\d,]+) MB \(largest of (\d+)\)",
                     out)
    assert peak, out[-2000:]
    assert 100 < int(peak.group(1).replace(",", "")) < 8000 and int(peak.group(2)) >= 1
    driver = re.search(r"driver ([\d,]+) MB", out)
    assert driver and int(driver.group(1).replace(",", "")) > 100, out[-2000:]

    # The adapter names its base and carries a model card that says how to load it.
    adapter = run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "all-minilm-l6-v2"
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nbase_model: sentence-transformers/all-MiniLM-L6-v2\n")
    assert "library_name: peft" in card and "fedtune.load(" in card
    assert "DP-SGD was off" in card and "classification head" in card

    # fedtune.load in a fresh process reproduces the run's held-out metrics exactly.
    code = ("import json, sys, fedtune\n"
            "run = fedtune.load(sys.argv[1])\n"
            "print(json.dumps({'eval': run.evaluate(), 'labels': run.labels,\n"
            "                  'pred': run.classify(['renal dialysis kidney creatinine'])}))\n")
    got = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert got.returncode == 0, got.stderr[-3000:]
    loaded = json.loads(got.stdout.strip().splitlines()[-1])
    assert loaded["eval"] == last["eval"]
    assert loaded["labels"] == sorted(LABELS) and loaded["pred"][0] in LABELS


def _marked(marker: str) -> list[int]:
    return marked_pids(marker.encode())


def _nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="scans /proc")
def test_sigterm_stops_simulation_and_leaves_no_process(tmp_path: Path):
    marker = f"FEDTUNE_TEST_MARK={uuid.uuid4().hex}"
    env = {**os.environ, "COLUMNS": "160", "PYTHONWARNINGS": "ignore",
           marker.split("=")[0]: marker.split("=")[1]}
    env.pop("RAY_worker_niceness", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtune", "simulate", *sets(
            "model.name=all-minilm-l6-v2", "model.max_length=32", "data.demo_records=80",
            "federation.num_sites=2", "federation.rounds=50", "train.local_steps=2",
            "train.batch_size=4", f"output.dir={tmp_path}", "output.run_name=stop")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "stop" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            # round 0 written: round 1 (the sites' training) has started
            if metrics.exists() and metrics.read_text().strip():
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(3)  # the site workers are up and training
        workers = [p for p in _marked(marker) if p != proc.pid
                   and b"ray::" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert workers, "no Ray worker found"
        # Sites run at the priority of the command, not Ray's lower default.
        assert {_nice(p) for p in workers} == {os.nice(0)}
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=15)[0]
        assert time.monotonic() - started < 15
        assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
        assert "stopped by SIGTERM" in out.replace("\n", " ")
        time.sleep(1)
        assert _marked(marker) == [], "processes left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _marked(marker):
            os.kill(pid, signal.SIGKILL)
