"""Loading a finished run: the base model with the run's adapter and, for classification,
fedtune's own head and the label names (`fedtune.load`); and the adapter's model card.

The adapter alone is not enough to rebuild the model: a classification run trains fedtune's
mean-pooling head (common/heads.py), initialised from the label names, not Hugging Face's
`AutoModelForSequenceClassification` head (which loads without error and predicts at chance).
So the model is rebuilt from the run's own config.toml, exactly as the server built it
(common/model_cache.py::build_runtime), and the saved weights are put into it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune.common.config import RunConfig, load_config
from fedtune.common.models import EMBEDDED, TaskKind
from fedtune.common.run_layout import RunLayout

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoadedRun:
    """A run's fine-tuned model, ready for inference (eval mode)."""

    model: torch.nn.Module  # PeftModel: base model + LoRA (+ the trained classifier head)
    tokenizer: Any
    task: TaskKind
    labels: list[str] | None  # classification: class index -> label name
    config: RunConfig  # the run's effective configuration (config.toml)
    run_dir: Path
    device: torch.device

    def evaluate(self, path: str | Path | None = None) -> dict[str, float]:
        """Held-out metrics on `path` (default: the run's own eval.jsonl), computed as the
        server computes them for metrics.jsonl."""
        from fedtune.common.data import read_records
        from fedtune.common.tasks import encode_records, evaluate

        data = encode_records(read_records(path or RunLayout(self.run_dir).eval_data),
                              self.tokenizer, self.config, self.task, self.labels)
        return evaluate(self.model, data, self.task, int(self.tokenizer.pad_token_id),
                        self.device)

    @torch.no_grad()
    def classify(self, texts: list[str]) -> list[str]:
        """Classification: the predicted label name of each text."""
        if self.task != "classification" or not self.labels:
            raise ValueError("classify() needs a classification run; use generate()")
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                               max_length=self.config.model.max_length).to(self.device)
        logits = self.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
        return [self.labels[i] for i in logits.argmax(-1).tolist()]

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 64) -> str:
        """Causal LM: the model's answer to one user prompt (greedy, chat template if any)."""
        if self.task != "causal_lm":
            raise ValueError("generate() needs a causal LM run; use classify()")
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                          add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
        else:
            ids = tok(prompt + "\n", return_tensors="pt")["input_ids"]
        ids = ids.to(self.device)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def load(run_dir: str | Path, checkpoint: int | None = None,
         device: str | None = None) -> LoadedRun:
    """The base model with a run's final adapter (or round `checkpoint`'s), its tokenizer and,
    for classification, fedtune's head and the label names. `device`: "cpu", "cuda" or
    "auto" (default: the run's model.device)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from fedtune.common.model_cache import build_runtime
    from fedtune.common.tasks import num_labels, resolve_task

    layout = RunLayout(Path(run_dir))
    if not layout.config.is_file():
        raise FileNotFoundError(f"{run_dir}: not a fedtune run directory (no config.toml)")
    cfg = load_config(layout.config)
    if device is not None:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"device": device})})
    adapter_dir = layout.adapter if checkpoint is None else layout.checkpoint(checkpoint)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (did a round finish?)")
    saved_base = json.loads((adapter_dir / "adapter_config.json").read_text()).get(
        "base_model_name_or_path")
    if saved_base not in (None, cfg.model.name):
        raise ValueError(f"{adapter_dir} was trained on {saved_base!r}, but the run's "
                         f"config.toml names {cfg.model.name!r}")
    task = resolve_task(cfg)
    rt = build_runtime(cfg, task, num_labels(cfg, task))
    state = load_file(str(adapter_dir / ADAPTER_WEIGHTS), device=str(rt.device))
    result = set_peft_model_state_dict(rt.model, state)
    if result.unexpected_keys:
        raise ValueError(f"{adapter_dir}: tensors the rebuilt model does not have: "
                         f"{result.unexpected_keys[:3]}")
    rt.model.eval()
    return LoadedRun(rt.model, rt.tokenizer, task,
                     list(cfg.data.labels) if task == "classification" else None,
                     cfg, layout.run_dir, rt.device)


def model_card(cfg: RunConfig, *, library_name: str = "peft", license_id: str | None = None,
               sections: str = "", load: str | None = None) -> str:
    """The adapter's README.md (Hugging Face model card): its base model, what was trained,
    the privacy settings of the run, and how to load it. An export (common/export.py) adds
    its `sections` (privacy spent, sites, evaluation) and replaces the Load section."""
    from fedtune.common.tasks import resolve_task

    task = resolve_task(cfg)
    emb = EMBEDDED.get(cfg.model.name.lower())
    base = emb.hub_id if emb else cfg.model.name
    tags = ["fedtune", "lora", "federated-learning",
            "differential-privacy" if cfg.dp.enabled else "no-differential-privacy",
            "text-classification" if task == "classification" else "text-generation"]
    copy = ""
    if emb:
        copy = (f" (fedtune's embedded copy of [{emb.hub_id}](https://huggingface.co/"
                f"{emb.hub_id})" + (", dequantized from its Q4_1 GGUF: not bit-identical to the "
                                    "hub's weights" if emb.gguf_file else "") + ")")
    lora = cfg.lora
    targets = ", ".join(lora.target_modules) if lora.target_modules else "PEFT's default"
    trained = f"LoRA (r = {lora.r}, alpha = {lora.alpha:g}, modules: {targets})"
    if task == "classification":
        trained += (f" and the classification head ({len(cfg.data.labels or [])} labels: "
                    f"{', '.join((cfg.data.labels or [])[:10])}"
                    + (", ..." if len(cfg.data.labels or []) > 10 else "") + ")")
    dp = cfg.dp
    if dp.enabled:
        noise = (f"noise multiplier {dp.noise_multiplier:g}" if dp.noise_multiplier is not None
                 else f"noise calibrated to a target ε = {dp.target_epsilon:g} for the run")
        data = cfg.data
        if data.person_level:
            privacy = (f"Person-level (ε, δ)-DP per site, per person (column "
                       f"`{data.privacy_unit}`): all the records of one person are protected "
                       "together. User-level DP-SGD (Charles et al. 2024) with Opacus: Poisson "
                       f"sampling over persons, {noise}, δ = {dp.delta:g} (below 1/persons), "
                       f"each person's mean gradient clipped to {dp.max_grad_norm:g}, "
                       f"{dp.accountant.upper()} accountant.")
        else:
            privacy = (f"Sample-level (ε, δ)-DP per site, per record, with DP-SGD (Opacus): "
                       f"{noise}, δ = {dp.delta:g}, per-example clipping norm "
                       f"{dp.max_grad_norm:g}, {dp.accountant.upper()} accountant. A person "
                       "with k records is protected only at about kε (group privacy)"
                       + (f"; `fedtune report` states that bound for the largest person "
                          f"(column `{data.person_column}`)" if data.person_column else "")
                       + ".")
        privacy += (" Each site's spent ε is in the run's metrics.jsonl and "
                    "`fedtune report <run dir>`.")
    else:
        privacy = "DP-SGD was off: this adapter carries no differential-privacy guarantee."
    if cfg.central_dp.enabled:
        c = cfg.central_dp
        privacy += (f" Site-level DP (central DP, {c.side} side, {c.clipping} clipping): noise "
                    f"multiplier {c.noise_multiplier:g}, clipping norm {c.clipping_norm:g}.")
    fed = cfg.federation
    use = ('print(run.classify(["some text"]))  # label names' if task == "classification"
           else 'print(run.generate("your prompt"))')
    card = f"""---
base_model: {base}
library_name: peft
tags:
{chr(10).join(f"- {t}" for t in tags)}
---

# {"LoRA adapter and classification head" if task == "classification" else "LoRA adapter"} \
trained with fedtune

Base model: `{cfg.model.name}`{copy}. Task: {task.replace("_", " ")}.

Trained: {trained}, federated over {fed.num_sites} sites for {fed.rounds} rounds \
({fed.strategy}, {cfg.train.local_steps} local steps of batch {cfg.train.batch_size}, \
max length {cfg.model.max_length} tokens).

## Privacy

{privacy}

## Load

```python
import fedtune
run = fedtune.load("path/to/run")  # the run directory: this folder's parent
{use}
```

`run.model` is the PEFT model, `run.tokenizer` its tokenizer{
", `run.labels` the label names (class index order)" if task == "classification" else ""}.
{"The head is fedtune's own (mean pooling, then a linear classifier started from the label "
 "names): `AutoModelForSequenceClassification` + `PeftModel.from_pretrained` loads without an "
 "error but predicts at chance." if task == "classification" else
 "Plain PEFT also works: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "
 "this_folder)`, with the base above."}
"""
    if load is not None:
        card = card.split("\n## Load\n", 1)[0] + sections + "\n## Load\n\n" + load
    front = (f"license: {license_id}\n" if license_id else "") + f"library_name: {library_name}\n"
    return card.replace("library_name: peft\n", front, 1)
