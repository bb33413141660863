"""Experiment tracking (TensorBoard, MLflow) and `fedtune export`, on the real libraries.

One real simulation with both tracking keys on: its rounds are read back from the TensorBoard
event file and the MLflow store, then it is exported merged and the merged model, loaded in a
fresh process with the standard `from_pretrained`, reproduces the run's final held-out loss.
A classification export is checked on a run directory built from fedtune's own runtime (no
training: cheap), and the refusals need no model at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedtune.common.config import ConfigError, config_to_toml, load_config
from fedtune.common.run_layout import RunLayout
from tests.conftest import FAST, REPO, run_fedtune, sets

# A fresh process loads the merged export with transformers' own class and evaluates it on
# the run's held-out split; the same for base + the exported PEFT adapter.
CHECK_MERGED = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from fedtune.common.config import load_config
from fedtune.common.data import read_records
from fedtune.common.models import resolve_model_path
from fedtune.common.tasks import encode_records, evaluate
run, out = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(out)
data = encode_records(read_records(run + "/eval.jsonl"), tok, load_config(run + "/config.toml"),
                      "causal_lm", None)
merged = AutoModelForCausalLM.from_pretrained(out)
peft = PeftModel.from_pretrained(
    AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m-instruct")),
    out + "/adapter")
cpu = torch.device("cpu")
print(json.dumps({"merged": evaluate(merged, data, "causal_lm", tok.pad_token_id, cpu),
                  "adapter": evaluate(peft, data, "causal_lm", tok.pad_token_id, cpu)}))
"""


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tracked_simulation_then_merged_export(tmp_path: Path):
    res = run_fedtune("simulate", *sets(*FAST, f"output.dir={tmp_path}", "output.run_name=lm",
                                        "federation.num_sites=1", "federation.rounds=1",
                                        "tracking.tensorboard=true", "tracking.mlflow=true"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_dir = tmp_path / "lm"
    records = _metrics(run_dir)
    final = records[-1]
    assert [r["round"] for r in records] == [0, 1]

    # TensorBoard: the round metrics, by round
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("eval/loss")}
    assert loss == pytest.approx({r["round"]: r["eval"]["loss"] for r in records}, rel=1e-6)
    assert events.Scalars("train/loss")[-1].value == pytest.approx(final["train_loss"], rel=1e-6)
    for site in final["sites"]:
        eps = events.Scalars(f"epsilon/{site['site_id']}")
        assert (eps[-1].step, eps[-1].value) == (1, pytest.approx(site["epsilon"], rel=1e-6))
    assert [e.step for e in events.Scalars("round/seconds")] == [1]

    # MLflow: the run (tagged with fedtune's run id), its params and metrics, closed FINISHED
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fedtune")
    (run,) = client.search_runs([exp.experiment_id], "tags.`fedtune.run_id` = 'lm'")
    assert run.info.status == "FINISHED" and run.info.run_name == "lm"
    assert run.data.params["federation.rounds"] == "1"
    assert run.data.params["model.name"] == "smollm2-135m-instruct"
    history = client.get_metric_history(run.info.run_id, "eval/loss")
    assert {m.step: m.value for m in history} == pytest.approx(
        {r["round"]: r["eval"]["loss"] for r in records})
    assert run.data.metrics["epsilon/site-0"] == pytest.approx(final["sites"][0]["epsilon"])

    # Export, merged: a standard model directory + tokenizer + model card + the adapter
    out = tmp_path / "export"
    res = run_fedtune("export", str(run_dir), "--out", str(out), "--merged")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no temp left
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    for line in ("base_model: HuggingFaceTB/SmolLM2-135M-Instruct", "library_name: transformers",
                 "license: apache-2.0", "- differential-privacy"):
        assert line in front, line
    site = final["sites"][0]
    assert f"| {site['site_id']} | {site['records']} | {site['epsilon']:.4g} | 1e-05 | rdp" in card
    assert "RDP accountant" in card and "does not cover" in card and "`train_loss`" in card
    assert "fedavg over 1 round(s) of 1 site(s)" in card and "LoRA rank 8" in card
    assert f"| 1 | {final['eval']['loss']:.4g} |" in card
    assert "AutoModelForCausalLM.from_pretrained" in card

    # The merged model, loaded by transformers alone in a fresh process, is the run's model.
    check = subprocess.run([sys.executable, "-c", CHECK_MERGED, str(run_dir), str(out)],
                           capture_output=True, text=True, timeout=600, cwd=REPO,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert check.returncode == 0, check.stderr[-3000:]
    got = json.loads(check.stdout.strip().splitlines()[-1])
    assert got["merged"]["loss"] == pytest.approx(final["eval"]["loss"], abs=1e-4)
    assert got["adapter"]["loss"] == pytest.approx(final["eval"]["loss"], abs=1e-4)

    # A second export into the same folder is refused without --force.
    again = run_fedtune("export", str(run_dir), "--out", str(out))
    assert again.returncode == 2 and "--force" in again.stderr
    # --force replaces it (here by the adapter alone), renamed into place in one step.
    from fedtune.common.export import export_run

    assert export_run(run_dir, out, force=True).kind == "adapter"
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    assert "library_name: peft" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "lm"]  # nothing left over


def _classification_run(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A finished-looking classification run directory: fedtune's own runtime with non-zero
    LoRA B and a moved head, saved as the server saves it, and its metrics.jsonl line."""
    from fedtune.common.data import read_records
    from fedtune.common.loading import model_card
    from fedtune.common.lora import save_adapter
    from fedtune.common.model_cache import build_runtime
    from fedtune.common.tasks import encode_records, evaluate

    labels = ["card_arrival", "balance", "lost_card"]
    cfg = load_config(None, ["model.name=all-minilm-l6-v2", f"data.labels={labels}",
                             "federation.rounds=1", "model.max_length=32"])
    rt = build_runtime(cfg, "classification", len(labels))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in rt.model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    run_dir = tmp_path / "cls"
    layout = RunLayout(run_dir)
    run_dir.mkdir()
    layout.config.write_text(config_to_toml(cfg))
    layout.eval_data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in [
        ("where is my new card", "card_arrival"), ("how much money do I have", "balance"),
        ("I lost my card yesterday", "lost_card"), ("card still not here", "card_arrival")]))
    save_adapter(rt.model, layout.adapter, model_card(cfg))
    data = encode_records(read_records(layout.eval_data), rt.tokenizer, cfg, "classification",
                          labels)
    metrics = evaluate(rt.model, data, "classification", rt.pad_id, rt.device)
    sites = [{"site_id": "site-0", "records": 40, "epsilon": 2.5, "delta": 1e-5,
              "accountant": "rdp", "status": "ok"}]
    layout.metrics.write_text("".join(json.dumps(r) + "\n" for r in [
        {"round": 0, "eval": metrics, "sites": []},
        {"round": 1, "eval": metrics, "sites": sites}]))
    return run_dir, rt.model.eval()


def test_classification_export_adapter_and_merged_head(tmp_path: Path):
    from peft import PeftConfig

    from fedtune.common.export import HEAD_CONFIG, export_run, load_merged_classifier

    run_dir, trained = _classification_run(tmp_path)
    adapter = export_run(run_dir, tmp_path / "adapter")
    assert adapter.kind == "adapter"
    conf = PeftConfig.from_pretrained(str(tmp_path / "adapter"))  # a PEFT adapter directory
    assert conf.base_model_name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "predicts at chance" in card

    merged = export_run(run_dir, tmp_path / "merged", merged=True)
    assert merged.kind == "merged-encoder+head"
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "does **not** load this" in card and HEAD_CONFIG in card
    texts = ["where is my card", "what is my balance", "I lost it"]
    from transformers import AutoModel, AutoTokenizer

    batch = AutoTokenizer.from_pretrained(tmp_path / "merged")(texts, padding=True,
                                                                return_tensors="pt")
    model = load_merged_classifier(tmp_path / "merged")
    with torch.no_grad():  # the merged classifier is the trained one (fedtune's own module)
        want = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.allclose(got.logits, want.logits, atol=1e-4)
    # The model card's own snippet (transformers + safetensors only) gives the same labels.
    snippet = card.split("```python\n")[-1].split("```")[0]
    scope: dict = {}
    exec(snippet.replace("path/to/this/folder", str(tmp_path / "merged")), scope)
    labels = ["card_arrival", "balance", "lost_card"]
    assert scope["classify"](texts) == [labels[i] for i in want.logits.argmax(-1).tolist()]
    # load_merged_classifier read the encoder with transformers' AutoModel, labels included
    assert isinstance(model.encoder, type(AutoModel.from_config(model.encoder.config)))
    assert model.encoder.config.id2label[0] == "card_arrival"


def test_export_refusals(tmp_path: Path):
    from fedtune.common.config import RunConfig
    from fedtune.common.export import ExportError, export_run

    with pytest.raises(ExportError, match="not a fedtune run directory"):
        export_run(tmp_path, tmp_path / "out")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    RunLayout(run_dir).config.write_text(config_to_toml(RunConfig()))
    with pytest.raises(ExportError, match="no finished adapter"):
        export_run(run_dir, tmp_path / "out")
    (RunLayout(run_dir).adapter).mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (RunLayout(run_dir).adapter / name).write_text("{}")
    with pytest.raises(ExportError, match="stopped after round 0 of 2.*--unfinished"):
        export_run(run_dir, tmp_path / "out")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty.*--force"):
        export_run(run_dir, busy, unfinished=True)
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="not a previous export"):
        export_run(run_dir, busy, unfinished=True, force=True)  # --force replaces only exports
    assert (busy / "keep.txt").read_text() == "mine"
    for inside in (run_dir / "export", tmp_path):
        with pytest.raises(ExportError, match="inside it or above it"):
            export_run(run_dir, inside, unfinished=True, force=True)


def test_tracking_key_without_its_library_is_refused_at_start(tmp_path: Path, monkeypatch):
    from fedtune.server.tracking import check_tracking
    from fedtune.simulations.runner import prepare_run

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow-skinny were not installed
    cfg = load_config(None, [f"output.dir={tmp_path}", "output.run_name=r",
                             "tracking.mlflow_uri=http://localhost:5000"])
    with pytest.raises(ConfigError,
                       match=r"tracking.mlflow_uri .*pip install 'fedtune\[tracking\]'"):
        check_tracking(cfg)
    with pytest.raises(ConfigError, match="tracking.mlflow_uri"):
        prepare_run(cfg)
    assert not (tmp_path / "r").exists()  # refused before the run directory was made
    check_tracking(load_config(None, ["tracking.tensorboard=true"]))  # installed: accepted
    assert not load_config(None, []).tracking.mlflow_enabled  # off by default
