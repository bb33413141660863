"""Exporting a finished run for use outside fedtune (`fedtune export`).

The export is a directory in the Hugging Face layout: the run's final adapter (PEFT), the
tokenizer and a model card; with `merged`, the adapter merged into the base model's weights.
What a merged model is depends on its head:

- causal LM, and classification with Hugging Face's own head (`task.pooling = "cls"`): a
  standard model directory (`AutoModelForCausalLM` / `AutoModelForSequenceClassification`),
  with the label names in its config (`id2label`);
- classification with fedtune's mean-pooling head (common/heads.py; the default for
  sentence-transformers models such as the embedded MiniLM): no Hugging Face class pools this
  way, so the directory holds the merged encoder (`AutoModel`) and the head in
  `fedtune_head.safetensors` + `fedtune_head.json`; `load_merged_classifier` (or the
  dependency-free snippet in the model card) rebuilds the classifier.

The directory is written next to `out` and renamed into place, so a crash leaves no half
export under `out`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common.config import RunConfig, load_config
from fedtune.common.disclosure import DISCLOSED
from fedtune.common.loading import ADAPTER_WEIGHTS, model_card
from fedtune.common.models import EMBEDDED
from fedtune.common.run_layout import RunLayout

HEAD_WEIGHTS = "fedtune_head.safetensors"
HEAD_CONFIG = "fedtune_head.json"
ADAPTER_SUBDIR = "adapter"  # a merged export keeps the PEFT adapter it was merged from here
# Licences of the embedded models (their Hugging Face model cards), for the card's front matter.
EMBEDDED_LICENSES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0",
    "sentence-transformers/all-MiniLM-L6-v2": "apache-2.0",
}
ADAPTER_FILES = ("adapter_config.json", ADAPTER_WEIGHTS)


class ExportError(ValueError):
    """The run cannot be exported as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    kind: str  # "adapter", "merged" (a standard class) or "merged-encoder+head"
    load_class: str  # how to load it, in one phrase


def _records(run_dir: Path) -> list[dict]:
    path = RunLayout(run_dir).metrics
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def check_exportable(run_dir: Path, *, unfinished: bool = False) -> tuple[RunConfig, list[dict]]:
    """The run's config and metrics records, or ExportError when it has no finished adapter."""
    layout = RunLayout(run_dir)
    if not layout.config.is_file():
        raise ExportError(f"{run_dir}: not a fedtune run directory (no config.toml)")
    if not all((layout.adapter / f).is_file() for f in ADAPTER_FILES):
        raise ExportError(f"{run_dir}: no finished adapter ({layout.adapter}/{ADAPTER_WEIGHTS} "
                          "is missing: did a round finish?)")
    cfg = load_config(layout.config)
    records = _records(run_dir)
    done = max((r["round"] for r in records), default=0)
    if done < cfg.federation.rounds and not unfinished:
        raise ExportError(f"{run_dir}: the run stopped after round {done} of "
                          f"{cfg.federation.rounds}; resume it, or export its last adapter "
                          "anyway with --unfinished")
    return cfg, records


def base_reference(cfg: RunConfig) -> str:
    """The base model as others can name it: the hub id an embedded model copies, or the
    configured name or path."""
    emb = EMBEDDED.get(cfg.model.name.lower())
    return emb.hub_id if emb else cfg.model.name


def base_license(cfg: RunConfig) -> str | None:
    """The base model's licence: its own model card's front matter, else a known embedded one."""
    from fedtune.common.models import resolve_model_path

    try:
        readme = Path(resolve_model_path(cfg.model.name, cfg.model.cache_dir)) / "README.md"
        text = readme.read_text(encoding="utf-8")
    except (OSError, ValueError, RuntimeError):
        text = ""
    if text.startswith("---"):
        for line in text.split("---", 2)[1].splitlines():
            if line.startswith("license:"):
                return line.split(":", 1)[1].strip() or None
    return EMBEDDED_LICENSES.get(base_reference(cfg))


def site_reports(records: list[dict]) -> list[dict]:
    """Each site's last reply of the run, as it reported it (the latest round it answered)."""
    last: dict[str, dict] = {}
    for rec in records:
        for site in rec.get("sites") or []:
            last[str(site.get("site_id"))] = {**site, "round": rec["round"]}
    return [last[k] for k in sorted(last)]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def card_sections(cfg: RunConfig, records: list[dict], eval_records: int | None,
                  adapter_config: dict | None = None) -> str:
    """The export's own model card sections: privacy spent per site, what the guarantee does
    not cover (common/disclosure.py), the method, the sites' sizes and the held-out
    evaluation."""
    out = ["", "### Privacy spent, per site (as each site reported it)", ""]
    sites = site_reports(records)
    if not cfg.dp.enabled:
        out.append("DP-SGD was off: no site spent or reported a privacy budget.")
    else:
        out += ["| site | records | ε (this run) | δ | accountant | last round | status |",
                "|---|---|---|---|---|---|---|"]
        for s in sites:
            out.append(f"| {s.get('site_id')} | {s.get('records', '?')} | "
                       f"{_fmt(s.get('epsilon', '-'))} | {_fmt(s.get('delta', '-'))} | "
                       f"{s.get('accountant', cfg.dp.accountant)} | {s['round']} | "
                       f"{s.get('status', '?')} |")
        out += ["", "ε is what the run spent at each site by its accountant; each site's ledger "
                "(and `fedtune report`) is the authority, over all its runs."]
    clear = [d for d in DISCLOSED if d.key != "parameters"]  # sent in clear, not DP-noised
    out += ["", "### What the guarantee covers and does not", "",
            "It covers what each site's DP-SGD protected: the adapter updates the sites sent, "
            "hence these weights. It does not cover hyper-parameters chosen on site data, "
            "timing, or the values a site sends in clear (fedtune's `common/disclosure.py`): "
            + "; ".join(f"`{d.key}` ({d.what})" for d in clear) + "."]
    fed, conf = cfg.federation, adapter_config or {}
    targets = conf.get("target_modules") or cfg.lora.target_modules
    if isinstance(targets, (list, set, tuple)):
        targets = ", ".join(sorted(targets))
    out += ["", "## Method", "",
            f"{fed.strategy} over {fed.rounds} round(s) of {fed.num_sites} site(s), "
            f"{cfg.train.local_steps} local DP-SGD step(s) per round "
            f"({cfg.train.optimizer}, lr {cfg.train.lr:g}); LoRA rank {conf.get('r', cfg.lora.r)}, "
            f"alpha {conf.get('lora_alpha', cfg.lora.alpha):g}, target modules: {targets}; "
            f"secure aggregation {'on' if fed.secagg else 'off'}"
            + ("; site-level central DP on" if cfg.central_dp.enabled else "") + "."]
    out += ["", "## Sites", "",
            f"{len(sites)} site(s) answered; their record counts as reported: "
            + (", ".join(f"{s.get('site_id')}: {s.get('records', '?')}" for s in sites)
               or "none") + "."]
    evals = [r for r in records if r.get("eval")]
    out += ["", "## Evaluation", ""]
    if not evals:
        out.append("No held-out evaluation was recorded.")
    else:
        where = (f"{eval_records} held-out records" if eval_records is not None
                 else "the held-out records")
        out += [f"On {where} at the coordinator (never trained on), from the run's "
                "metrics.jsonl:", "", "| round | " + " | ".join(evals[-1]["eval"]) + " |",
                "|---|" + "---|" * len(evals[-1]["eval"])]
        for r in ([evals[0], evals[-1]] if len(evals) > 1 else evals):
            out.append(f"| {r['round']}{' (before training)' if r['round'] == 0 else ''} | "
                       + " | ".join(_fmt(r["eval"].get(k)) for k in evals[-1]["eval"]) + " |")
    return "\n".join(out) + "\n"


def _load_section(cfg: RunConfig, kind: str, labels: list[str] | None) -> str:
    """How to load what this export holds (the model card's Load section)."""
    base = base_reference(cfg)
    if kind == "adapter":
        if labels is not None:
            return ("The adapter includes fedtune's own classification head (mean pooling, "
                    "then a linear classifier started from the label names): "
                    "`AutoModelForSequenceClassification` + `PeftModel.from_pretrained` loads "
                    "it without an error but predicts at chance. Export with `--merged` for "
                    "the merged weights and a standalone loader, or use "
                    "`fedtune.load(run_dir)` on the run directory.\n")
        return (f"```python\nfrom peft import PeftModel\nfrom transformers import "
                f"AutoModelForCausalLM, AutoTokenizer\n\nbase = AutoModelForCausalLM."
                f"from_pretrained(\"{base}\")\nmodel = PeftModel.from_pretrained(base, "
                f"\"path/to/this/folder\")\ntokenizer = AutoTokenizer.from_pretrained("
                f"\"path/to/this/folder\")\n```\n")
    if kind == "merged":
        cls = "AutoModelForSequenceClassification" if labels is not None else \
            "AutoModelForCausalLM"
        return (f"The adapter is merged into the base weights: a standard model.\n\n```python\n"
                f"from transformers import {cls}, AutoTokenizer\n\nmodel = {cls}."
                f"from_pretrained(\"path/to/this/folder\")\ntokenizer = AutoTokenizer."
                f"from_pretrained(\"path/to/this/folder\")\n```\n\n"
                f"`{ADAPTER_SUBDIR}/` holds the PEFT adapter it was merged from.\n")
    return (f"The adapter is merged into the encoder's weights. The head is fedtune's own, "
            f"which no Hugging Face class expresses (masked mean of the last hidden states, "
            f"L2-normalised if `{HEAD_CONFIG}` says so, then a linear layer times a fixed "
            f"`logit_scale`), so `AutoModelForSequenceClassification` does **not** load this "
            f"model correctly. The encoder is a standard `AutoModel`; the head is in "
            f"`{HEAD_WEIGHTS}`:\n\n```python\nimport json, torch\nfrom safetensors.torch import "
            f"load_file\nfrom transformers import AutoModel, AutoTokenizer\n\npath = "
            f"\"path/to/this/folder\"\nencoder = AutoModel.from_pretrained(path).eval()\n"
            f"tokenizer = AutoTokenizer.from_pretrained(path)\nhead = json.load(open(f\"{{path}}/"
            f"{HEAD_CONFIG}\"))\nw = load_file(f\"{{path}}/{HEAD_WEIGHTS}\")\n\n"
            f"def classify(texts):\n    b = tokenizer(texts, padding=True, truncation=True, "
            f"max_length=head[\"max_length\"], return_tensors=\"pt\")\n    with torch.no_grad():\n"
            f"        h = encoder(**b).last_hidden_state\n    m = b[\"attention_mask\"]."
            f"unsqueeze(-1).to(h.dtype)\n    v = (h * m).sum(1) / m.sum(1).clamp(min=1)\n"
            f"    if head[\"normalize\"]:\n        v = torch.nn.functional.normalize(v, dim=-1)\n"
            f"    logits = head[\"logit_scale\"] * (v @ w[\"weight\"].T + w[\"bias\"])\n"
            f"    return [head[\"labels\"][i] for i in logits.argmax(-1).tolist()]\n```\n\n"
            f"With fedtune installed: `fedtune.common.export.load_merged_classifier(path)` "
            f"returns the classifier module. `{ADAPTER_SUBDIR}/` holds the PEFT adapter it was "
            f"merged from.\n")


def _copy_adapter(cfg: RunConfig, run_dir: Path, dest: Path) -> None:
    """The run's final adapter files, with the base named as others can load it."""
    dest.mkdir(parents=True, exist_ok=True)
    adapter = RunLayout(run_dir).adapter
    shutil.copyfile(adapter / ADAPTER_WEIGHTS, dest / ADAPTER_WEIGHTS)
    conf = adapter_config(run_dir)
    conf["base_model_name_or_path"] = base_reference(cfg)
    (dest / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n",
                                              encoding="utf-8")


def _save_merged(loaded: Any, dest: Path) -> str:
    """Merge the adapter into the base weights and save them; returns the export's kind."""
    import torch
    from safetensors.torch import save_file

    from fedtune.common.heads import MeanPoolingClassifier

    merged = loaded.model.merge_and_unload()
    labels = loaded.labels
    if isinstance(merged, MeanPoolingClassifier):
        encoder = merged.encoder
        if labels:
            encoder.config.id2label = dict(enumerate(labels))
            encoder.config.label2id = {x: i for i, x in enumerate(labels)}
        encoder.save_pretrained(dest)
        clf = merged.classifier
        save_file({"weight": clf.weight.detach().to(torch.float32).contiguous().cpu(),
                   "bias": clf.bias.detach().to(torch.float32).contiguous().cpu()},
                  str(dest / HEAD_WEIGHTS))
        (dest / HEAD_CONFIG).write_text(json.dumps({
            "pooling": "mean", "normalize": bool(merged.normalize),
            "logit_scale": float(merged.logit_scale), "labels": labels,
            "max_length": loaded.config.model.max_length,
        }, indent=2) + "\n", encoding="utf-8")
        return "merged-encoder+head"
    if labels:
        merged.config.id2label = dict(enumerate(labels))
        merged.config.label2id = {x: i for i, x in enumerate(labels)}
    merged.save_pretrained(dest)
    return "merged"


def load_merged_classifier(path: str | Path) -> Any:
    """A merged mean-pooling export as fedtune's classifier module (eval mode); its logits
    are the run's."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    from fedtune.common.heads import MeanPoolingClassifier

    path = Path(path)
    head = json.loads((path / HEAD_CONFIG).read_text(encoding="utf-8"))
    weights = load_file(str(path / HEAD_WEIGHTS))
    encoder = AutoModel.from_pretrained(path)
    model = MeanPoolingClassifier(encoder, len(head["labels"]), normalize=head["normalize"])
    with torch.no_grad():
        model.classifier.weight.copy_(weights["weight"].to(model.classifier.weight.dtype))
        model.classifier.bias.copy_(weights["bias"].to(model.classifier.bias.dtype))
        model.logit_scale.fill_(float(head["logit_scale"]))
    return model.eval()


def run_tokenizer(cfg: RunConfig) -> Any:
    """The tokenizer the run used: the base model's, with its pad token as fedtune sets it
    (common/models.py::load_base_model)."""
    from transformers import AutoTokenizer

    from fedtune.common.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name, cfg.model.cache_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def adapter_config(run_dir: Path) -> dict:
    """The run's final adapter_config.json."""
    path = RunLayout(run_dir).adapter / "adapter_config.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _is_export(path: Path) -> bool:
    """Does `path` look like an export (what --force may replace)?"""
    return path.is_dir() and (path / "README.md").is_file() and any(
        (path / f).is_file() for f in ("adapter_config.json", "config.json"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def export_run(run_dir: str | Path, out: str | Path, *, merged: bool = False,
               force: bool = False, unfinished: bool = False,
               device: str = "cpu") -> ExportResult:
    """Write the run's final adapter (or, `merged`, the merged model) with its tokenizer and a
    model card to `out`. Refuses an existing non-empty `out` unless `force` (then replaced)."""
    run_dir, out = Path(run_dir), Path(out)
    cfg, records = check_exportable(run_dir, unfinished=unfinished)
    run_abs, out_abs = run_dir.resolve(), out.resolve()
    if out_abs == run_abs or run_abs in out_abs.parents or out_abs in run_abs.parents:
        raise ExportError(f"{out} is the run directory, inside it or above it; choose a "
                          "folder outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise ExportError(f"{out} exists and is not empty; choose another --out or pass "
                              "--force to replace it")
        if not _is_export(out):
            raise ExportError(f"{out} is not a previous export (no README.md with "
                              "adapter_config.json or config.json); not replacing it, even "
                              "with --force")
    from fedtune.common.loading import load
    from fedtune.common.tasks import resolve_task

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if merged:
            loaded = load(run_dir, device=device)
            labels, tokenizer = loaded.labels, loaded.tokenizer
            kind = _save_merged(loaded, tmp)
            _copy_adapter(cfg, run_dir, tmp / ADAPTER_SUBDIR)
        else:  # the adapter's files as they are: no model to load
            labels = list(cfg.data.labels or []) if resolve_task(cfg) == "classification" \
                else None
            tokenizer = run_tokenizer(cfg)
            kind = "adapter"
            _copy_adapter(cfg, run_dir, tmp)
        tokenizer.save_pretrained(tmp)
        eval_path = RunLayout(run_dir).eval_data
        n_eval = (sum(1 for x in eval_path.read_text(encoding="utf-8").splitlines() if x.strip())
                  if eval_path.is_file() else None)
        card = model_card(cfg, library_name="peft" if kind == "adapter" else "transformers",
                          license_id=base_license(cfg),
                          sections=card_sections(cfg, records, n_eval, adapter_config(run_dir)),
                          load=_load_section(cfg, kind, labels))
        if kind != "adapter":
            card = card.replace("\n# LoRA adapter", "\n# Base model merged with a LoRA adapter", 1)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        _fsync_tree(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from its users
        old = out.with_name(f".{out.name}.replaced")
        _remove(old)  # left by a crash during an earlier --force
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        _remove(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_class = {"adapter": "PeftModel.from_pretrained on the base",
                  "merged": ("AutoModelForSequenceClassification" if labels is not None
                             else "AutoModelForCausalLM") + ".from_pretrained",
                  }.get(kind, "AutoModel (encoder) + fedtune's head: see README.md")
    return ExportResult(out, kind, load_class)
