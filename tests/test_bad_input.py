"""Bad input at a site, and contradictory settings: refused before any training, with a message
that names the file, line or key and says what to do, and without leaving partial state."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedtune.client.preflight import check_state_dir, preflight
from fedtune.client.site_config import load_site_config
from fedtune.common.config import ConfigError, load_config
from fedtune.common.data import DataError, Record, read_records, write_jsonl
from fedtune.common.input_checks import check_file_records, check_task_records, warn_long_records

REPO = Path(__file__).resolve().parents[1]
GOOD = [{"text": f"my card number {i} was declined", "label": "ab"[i % 2]} for i in range(20)]


def _site(tmp_path: Path, data_name: str = "train.jsonl", *, state: str = "state",
          privacy: str = "") -> Path:
    toml = tmp_path / "site.toml"
    toml.write_text(f'site_id = "h-1"\ndata = "{data_name}"\nstate_dir = "{state}"\n'
                    '[coordinator]\naddress = "127.0.0.1:9092"\n' + privacy)
    return toml


def _problems(tmp_path: Path, **kw) -> list[str]:
    return preflight(load_site_config(_site(tmp_path, **kw), insecure=True))


def _jsonl(path: Path, lines: list[str]) -> None:
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")


@pytest.mark.parametrize("name, content, expected", [
    ("train.jsonl", ['{"text": "a b", "label": "a"}', '{"text": "c", "label": "b"}',
                     '{"text": "d", "label": '], "train.jsonl:3: not valid JSON"),
    ("train.jsonl", ['{"text": "a b", "label": "a"}', '["text", "label"]'],
     "train.jsonl:2: expected a JSON object"),
    ("train.jsonl", ['{"text": "a b", "label": "a"}', '{"text": "c"}'],
     "train.jsonl:2: missing key 'label' (line 1 has: text, label)"),
    ("train.jsonl", ['{"text": "a b", "label": "a"}', '{"text": "  ", "label": "b"}'],
     "train.jsonl:2: 'text' must be a non-empty string"),
    ("train.jsonl", ["", "  "], "train.jsonl: no records"),
    ("train.csv", ["text,label", "hello,a", "a,b,c"], "train.csv:3: expected 2 columns"),
    ("train.csv", ["text,label", "hello,a", "world"], "train.csv:3: expected 2 columns"),
    ("train.csv", [], "train.csv:1: missing CSV header"),
])
def test_malformed_data_is_named_by_file_line_and_key(tmp_path, name, content, expected):
    _jsonl(tmp_path / name, content)
    problems = _problems(tmp_path, data_name=name)
    assert len(problems) == 1 and problems[0].startswith("data: ")
    assert expected in problems[0], problems
    assert not (tmp_path / "state" / "privacy_ledger.sqlite").exists()  # nothing was written
    assert [p.name for p in (tmp_path / "state").iterdir()] == []


def test_unreadable_and_absurd_files(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b'{"text": "caf\xe9", "label": "a"}\n')  # latin-1
    assert "cannot read" in _problems(tmp_path)[0]
    (tmp_path / "train.jsonl").write_bytes(b"")
    assert "no records" in _problems(tmp_path)[0]
    # A CSV whose unclosed quote swallows the rest of the file.
    rows = ["text,label", "fine,a", '"unclosed,a', *(f"line {i},b" for i in range(12_000))]
    _jsonl(tmp_path / "broken.csv", rows)
    problem = _problems(tmp_path, data_name="broken.csv")[0]
    assert "broken.csv:" in problem and "unclosed quote" in problem, problem
    # A record far beyond any text (a JSON line with a whole file pasted in).
    _jsonl(tmp_path / "huge.jsonl", ['{"text": "ok", "label": "a"}',
                                     json.dumps({"text": "x" * 1_000_001, "label": "b"})])
    problem = _problems(tmp_path, data_name="huge.jsonl")[0]
    assert "huge.jsonl:2: record is 1,000,002 characters long" in problem
    # Unsupported format, missing file: site.toml's own checks name the key.
    (tmp_path / "train.txt").write_text("hello\n")
    with pytest.raises(ConfigError, match=r"data: unsupported format '.txt'"):
        _problems(tmp_path, data_name="train.txt")
    with pytest.raises(ConfigError, match=r"data: file not found: .*nothing.jsonl"):
        _problems(tmp_path, data_name="nothing.jsonl")


def test_state_dir_problems(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GOOD)
    (tmp_path / "a-file").write_text("x")
    assert check_state_dir(tmp_path / "a-file") == [
        f"state_dir: {tmp_path / 'a-file'} exists and is not a directory"]
    with pytest.raises(ConfigError, match=r"state_dir: cannot create .*a-file/state"):
        _problems(tmp_path, state="a-file/state")  # site.toml's own check, naming the key
    problems = check_state_dir(tmp_path / "a-file" / "state")
    assert problems[0].startswith("state_dir: cannot create") and "Not a directory" in problems[0]
    # Disk full: fewer free bytes than the ledger needs (the real free space of this disk).
    full = check_state_dir(tmp_path / "state", min_free=2**62)
    assert full and "MiB free" in full[0] and "free some space" in full[0]
    assert not any(p.name.startswith(".fedtune-probe") for p in (tmp_path / "state").iterdir())


def test_damaged_ledger_stops_the_site(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GOOD)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "privacy_ledger.sqlite").write_bytes(b"this is not sqlite" * 100)
    problems = _problems(tmp_path)
    assert len(problems) == 1 and "privacy ledger" in problems[0]
    assert "must not train without its ledger" in problems[0]

    from fedtune.common.ledger import PrivacyLedger

    (tmp_path / "state" / "privacy_ledger.sqlite").unlink()
    PrivacyLedger(tmp_path / "state", "h-1").record_decline(run_id="r", round=1, reason="x")
    assert _problems(tmp_path) == []  # a healthy ledger passes


def test_site_delta_not_below_one_over_records(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GOOD)  # 20 records: delta must be < 0.05
    problems = _problems(tmp_path, privacy="[privacy]\ndelta = 0.1\n")
    assert len(problems) == 1 and problems[0].startswith("privacy.delta:")
    assert "not below 1/records = 1/20" in problems[0] and "choose privacy.delta <" in problems[0]


def _cli(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtune", *args], cwd=cwd, timeout=timeout,
                          capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "ignore"})


def test_cli_check_and_daemon_refuse_bad_data_before_starting(tmp_path):
    _jsonl(tmp_path / "train.jsonl", ['{"text": "a b", "label": "a"}', '{"text": "c"}'])
    _site(tmp_path)
    res = _cli("client", "--config", "site.toml", "--insecure", "--check", cwd=tmp_path)
    assert res.returncode == 2
    assert "train.jsonl:2: missing key 'label'" in res.stderr.replace("\n", "")

    res = _cli("client", "--config", "site.toml", "--insecure", "--max-restarts", "0",
               cwd=tmp_path)
    events = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert res.returncode == 2, res.stdout + res.stderr
    assert events[-1]["event"] == "invalid_input" and events[-1]["level"] == "error"
    assert "train.jsonl:2: missing key 'label'" in events[-1]["problems"][0]
    assert "supernode_started" not in [e["event"] for e in events]  # nothing was started
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == []  # no partial state


# ---------------------------------------------------------------------------------------------
# Checks that need the run's settings: at the site when the run arrives, before any spend.


def _records(rows: list[dict], source: str = "site.jsonl") -> list[Record]:
    return [Record(r, source, i + 1) for i, r in enumerate(rows)]


def test_run_checks_name_the_label_and_the_missing_column():
    cfg = load_config(None, ["model.name=all-minilm-l6-v2"])
    rows = [*GOOD[:3], {"text": "hello", "label": "zz"}]
    with pytest.raises(DataError, match=r"site.jsonl:4: 'label' = 'zz' is not in the run's label "
                                        r"set \(2 labels: a, b\)"):
        check_task_records(_records(rows), cfg, "classification", ["a", "b"])
    cfg = load_config(None, ["data.input_key=question", "data.output_key=answer"])
    with pytest.raises(DataError, match="site.jsonl:2: missing key 'answer'"):
        check_task_records(_records([{"question": "q", "answer": "a"}, {"question": "q"}]), cfg,
                           "causal_lm", None)
    check_file_records(_records([{"question": "q", "answer": "a"}]))  # any columns are fine


def test_long_texts_are_truncated_with_a_warning(caplog):
    cfg = load_config(None, ["model.max_length=32"])
    rows = [*GOOD[:2], {"text": "word " * 200, "label": "a"}, {"text": "x " * 1000, "label": "b"}]
    with caplog.at_level(logging.WARNING, logger="fedtune.data"):
        assert warn_long_records(_records(rows), cfg, "classification") == 2
    assert "2 record(s) are far longer than model.max_length = 32" in caplog.text
    assert "lines 3, 4" in caplog.text


def test_bad_label_at_run_start_spends_nothing(tmp_path):
    """The site's first round of a run: the data is checked before the ledger records a spend."""
    from fedtune.client.client_app import FedtuneClient, SiteSpec
    from fedtune.common.ledger import PrivacyLedger
    from fedtune.common.lora import get_adapter
    from fedtune.common.model_cache import get_runtime

    cfg = load_config(None, ["model.name=all-minilm-l6-v2", "model.max_length=16",
                             'data.labels=["a", "b"]', "train.local_steps=1"])
    write_jsonl(tmp_path / "train.jsonl", [*GOOD, {"text": "unknown intent", "label": "c"}])
    spec = SiteSpec("h-1", tmp_path / "train.jsonl", tmp_path / "state")
    params = get_adapter(get_runtime(cfg, "classification", 2).model)
    with pytest.raises(DataError, match=r"train.jsonl:21: 'label' = 'c' is not in the run's"):
        FedtuneClient(spec, cfg).fit(params, {"run_id": "r1", "server_round": 1,
                                              "local_steps": 1, "num_rounds": 2})
    ledger = PrivacyLedger(tmp_path / "state", "h-1")
    assert ledger.rows() == [] and ledger.plans() == [] and ledger.payloads() == []


# ---------------------------------------------------------------------------------------------
# Simulation: checked up front, and a refused run leaves no run directory.


def test_simulation_refuses_bad_data_and_leaves_nothing(tmp_path):
    from fedtune.common.privacy import PrivacyBudgetError
    from fedtune.simulations.runner import prepare_run

    _jsonl(tmp_path / "data.jsonl", [json.dumps(r) for r in GOOD] + ['{"text": "x"}'])
    cfg = load_config(None, ["model.name=all-minilm-l6-v2", f"data.train={tmp_path}/data.jsonl",
                             f"output.dir={tmp_path}/runs", "output.run_name=r"])
    with pytest.raises(DataError, match="data.jsonl:21: missing key 'label'"):
        prepare_run(cfg)
    assert not (tmp_path / "runs" / "r").exists()

    write_jsonl(tmp_path / "data.jsonl", GOOD * 3)  # 60 records, 3 sites of ~18
    cfg = load_config(None, ["model.name=all-minilm-l6-v2", f"data.train={tmp_path}/data.jsonl",
                             f"output.dir={tmp_path}/runs", "output.run_name=r",
                             "data.partition=dirichlet", "data.dirichlet_alpha=0.05",
                             "dp.delta=0.04"])
    with pytest.raises(PrivacyBudgetError, match="dp.delta = 0.04 is not below"):
        prepare_run(cfg)
    assert not (tmp_path / "runs" / "r").exists()  # not half of the site folders


# ---------------------------------------------------------------------------------------------
# Contradictory settings.


@pytest.mark.parametrize("overrides, expected", [
    (["federation.num_sites=2", "federation.min_fit_sites=3"],
     "lower federation.min_fit_sites or raise federation.num_sites"),
    (["federation.secagg=true", "federation.num_sites=2"],
     "SecAgg+ needs at least 3 sites (federation.num_sites = 2)"),
    (["federation.secagg=true", "federation.num_sites=9", "federation.fraction_fit=0.3"],
     "Raise federation.fraction_fit to at least 0.67, or set federation.secagg = false"),
    (["federation.round_timeout_s=0"], "federation.round_timeout_s"),
    (["federation.max_update_norm=-1"], "federation.max_update_norm"),
])
def test_contradictory_settings_are_refused_with_the_fix(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert expected in str(err.value)


def test_deployment_turns_secagg_on_and_then_needs_three_sites():
    from fedtune.server.deployment_run import deployment_config

    cfg = load_config(None, ["federation.num_sites=2"])  # fine for a simulation (no SecAgg+)
    with pytest.raises(ConfigError, match="SecAgg.*at least 3 sites.*federation.secagg = false"):
        deployment_config(cfg)
    assert deployment_config(load_config(None, ["federation.num_sites=2",
                                                "federation.secagg=false"]))


def test_read_records_reports_the_first_bad_line(tmp_path):
    _jsonl(tmp_path / "x.jsonl", ['{"a": 1}', "{oops", '{"a": 2}'])
    with pytest.raises(DataError, match=r"x.jsonl:2: not valid JSON"):
        read_records(tmp_path / "x.jsonl")
    assert np.isfinite(1.0)
