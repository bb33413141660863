"""Audited lower bound vs accountant epsilon: the one-run audit of Steinke, Nasr & Jagielski
(NeurIPS 2023) on fedtune's DP-LoRA (simulations/audit.py), writes results/audit.md.

    python -m benchmarks.bench_audit                          # eps 1 2 4 8, both modes
    python -m benchmarks.bench_audit --level trainer --eps 8  # one site's DP-SGD alone
    python -m benchmarks.bench_audit --level trainer --model smollm2 --append  # MedQuAD

Levels: `federated` runs `fedtune audit`'s path (Flower simulation, auditor site-0, MiniLM on
Banking77 from ../shared/datasets if present, else fedtune's demo data); `trainer` audits one
site's DP-SGD alone (client.trainer.train_local with gradient canaries, white-box only), which
affords many more steps on a CPU. The table states m, the sizes and the wall time of every row.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import typer

from fedtune.common.config import load_config

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("FEDTUNE_DATASETS", REPO.parent / "shared" / "datasets"))
MINILM = "all-minilm-l6-v2"
SMOLLM2 = "smollm2-135m-instruct"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _data_overrides(records: int) -> tuple[list[str], str]:
    banking = DATASETS / "banking77" / "train.csv"
    if banking.is_file():
        return ([f"data.train={banking}", "data.text_column=text",
                 "data.label_column=category", f"data.max_records_per_site={records}"],
                f"Banking77 (≤ {records} records per site)")
    return ([f"data.demo_records={records * 3}", f"data.max_records_per_site={records}"],
            f"fedtune demo data (≤ {records} records per site)")


def _federated(eps: float, mode: str, m: int, args: dict, out: Path) -> dict:
    from fedtune.simulations.audit import run_audit

    data, what = _data_overrides(args["records"])
    model = [f"model.name={MINILM}", "model.max_length=32"]
    if args["model"] == "smollm2":  # SmolLM2 on MedQuAD question -> answer, as _smollm2_site
        records = args["records"]
        data = [f"data.train={DATASETS / 'medquad' / 'medquad.jsonl'}",
                "data.input_key=question", "data.output_key=answer",
                f"data.max_records_per_site={records}"]
        what = f"SmolLM2-135M, MedQuAD (≤ {records} records per site, ≤ 64 tokens)"
        model = [f"model.name={SMOLLM2}", "model.max_length=64"]
    cfg = load_config(None, [
        *model, f"dp.target_epsilon={eps}",
        f"federation.num_sites={args['sites']}", f"federation.rounds={args['rounds']}",
        f"train.local_steps={args['steps']}", f"train.batch_size={args['batch']}",
        "data.max_eval_records=32", f"output.dir={out}",
        f"output.run_name=audit-{mode}-eps{eps:g}-{time.strftime('%H%M%S')}", *data,
    ])
    r = run_audit(cfg, mode, m)  # type: ignore[arg-type]
    return {**r.to_dict(), "data": what,
            "setting": f"{args['sites']} sites × {args['rounds']} rounds × {args['steps']} "
                       f"steps, batch {args['batch']}"}


def _smollm2_site(records: int):
    """SmolLM2-135M-Instruct + LoRA (common.model_cache) on the first `records` MedQuAD
    question/answer pairs (../shared/datasets/medquad/medquad.jsonl), max_length 64."""
    from fedtune.common.config import RunConfig
    from fedtune.common.data import read_records
    from fedtune.common.model_cache import get_runtime
    from fedtune.common.tasks import encode_records

    medquad = DATASETS / "medquad" / "medquad.jsonl"
    recs = read_records(medquad)[:records]
    cfg = RunConfig.model_validate({"model": {"name": SMOLLM2, "max_length": 64},
                                    "data": {"input_key": "question", "output_key": "answer"}})
    rt = get_runtime(cfg, "causal_lm", None)
    data = encode_records(recs, rt.tokenizer, cfg, "causal_lm", None)
    what = f"MedQuAD (first {len(data)} records, ≤ 64 tokens)"
    return rt.model, data, rt.pad_id, rt.device, "causal_lm", what


def _trainer(eps: float, m: int, args: dict) -> dict:
    import torch

    from fedtune.client.trainer import poisson_sample_rate
    from fedtune.common.config import DPConfig, LoraSettings, RunConfig, TrainConfig
    from fedtune.common.data import Record, read_records
    from fedtune.common.demo_data import classification_demo
    from fedtune.common.lora import apply_lora, set_adapter
    from fedtune.common.models import load_base_model
    from fedtune.common.privacy import calibrate_noise
    from fedtune.common.tasks import encode_records
    from fedtune.simulations.audit import audit_local

    dp = DPConfig(target_epsilon=eps, delta=1e-5)
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    if args["model"] == "smollm2":
        model, data, pad_id, dev, task, what = _smollm2_site(args["records"])
        initial = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        q = poisson_sample_rate(len(data), args["batch"])
        sigma = calibrate_noise(eps, dp.delta, q, args["steps"])
        try:
            r = audit_local(model, data, task=task, pad_id=pad_id, device=dev,
                            train=TrainConfig(batch_size=args["batch"], lr=0.05,
                                              optimizer="sgd"),
                            dp=dp, noise_multiplier=sigma, steps=args["steps"], m=m)
        finally:  # the cached runtime starts each ε from the initial adapter
            set_adapter(model, [t.numpy() for t in initial])
        return {**r.to_dict(), "data": f"SmolLM2-135M, {what}",
                "setting": f"one site, {args['steps']} steps, q = {q:.3g}, σ = {sigma:.3g}"}

    banking = DATASETS / "banking77" / "train.csv"
    if banking.is_file():
        recs = read_records(banking)[: args["records"]]
        cols, what = {"text_column": "text", "label_column": "category"}, "Banking77"
    else:
        demo = classification_demo(args["records"])
        recs = [Record(r, "demo", i + 1) for i, r in enumerate(demo)]
        cols, what = {}, "fedtune demo data"
    labels = sorted({str(r.fields[cols.get("label_column", "label")]) for r in recs})
    cfg = RunConfig.model_validate({"model": {"name": MINILM, "max_length": 32},
                                    "data": {"labels": labels, **cols}})
    base, tok, dev = load_base_model(MINILM, "classification", num_labels=len(labels),
                                     labels=labels)
    model = apply_lora(base, "classification", LoraSettings())
    data = encode_records(recs, tok, cfg, "classification", labels)
    q = poisson_sample_rate(len(data), args["batch"])
    sigma = calibrate_noise(eps, dp.delta, q, args["steps"])
    r = audit_local(model, data, task="classification", pad_id=tok.pad_token_id, device=dev,
                    train=TrainConfig(batch_size=args["batch"], lr=0.05, optimizer="sgd"),
                    dp=dp, noise_multiplier=sigma, steps=args["steps"], m=m)
    return {**r.to_dict(), "data": f"{what} ({len(data)} records)",
            "setting": f"one site, {args['steps']} steps, q = {q:.3g}, σ = {sigma:.3g}"}


HEADER = [
    "# Empirical privacy audit: audited lower bound vs accountant ε",
    "",
    "One-run audit of Steinke, Nasr & Jagielski (NeurIPS 2023), `simulations/audit.py`; "
    "lower bounds at 95 % confidence, δ = 1e-5, guesses k+ = k- chosen from a fixed grid "
    "with a Bonferroni correction. Measured on this machine (2 shared CPU cores).",
]


def _markdown(rows: list[dict], command: str, level: str) -> str:
    lines = [
        "",
        f"## Level: {level}",
        "",
        f"Command: `{command}`",
        "",
        "| mode | data | setting | m | accountant ε | audited lower bound | tightness "
        "| right guesses | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['data']} | {r['setting']} | {r['m']} | "
            f"{r['accountant_epsilon']:.3g} | {r['lower_bound']:.3g} | "
            f"{r['lower_bound'] / r['accountant_epsilon']:.3f} | "
            f"{r['correct']}/{r['guesses']} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


@app.command()
def main(
    eps: list[float] = typer.Option([1.0, 2.0, 4.0, 8.0], "--eps"),
    modes: list[str] = typer.Option(["white-box", "black-box"], "--mode"),
    level: str = typer.Option("federated", "--level", help="federated or trainer"),
    model: str = typer.Option("minilm", "--model",
                              help="minilm (Banking77) or smollm2 (MedQuAD)"),
    canaries_white: int = typer.Option(1000, "--canaries-white"),
    canaries_black: int = typer.Option(200, "--canaries-black"),
    sites: int = typer.Option(2, "--sites"),
    rounds: int = typer.Option(2, "--rounds"),
    steps: int = typer.Option(10, "--steps"),
    batch: int = typer.Option(16, "--batch"),
    records: int = typer.Option(200, "--records", help="records per site (trainer: in all)"),
    out: Path = typer.Option(REPO / "results" / "audit.md", "--out"),
    runs: Path = typer.Option(Path("/tmp/fedtune-bench-audit"), "--runs"),
    append: bool = typer.Option(False, "--append", help="Add a section to --out."),
    repeat: int = typer.Option(1, "--repeat", min=1, help="Independent runs per ε (the bound "
                               "is itself random: one row each)."),
) -> None:
    """Audit at each epsilon and mode; write the table to --out."""
    args = {"sites": sites, "rounds": rounds, "steps": steps, "batch": batch,
            "records": records, "model": model}
    rows = []
    for mode in modes if level == "federated" else ["white-box"]:
        for e, i in ((e, i) for e in eps for i in range(repeat)):
            m = canaries_white if mode == "white-box" else canaries_black
            row = (_federated(e, mode, m, args, runs) if level == "federated"
                   else _trainer(e, m, args))
            if repeat > 1:
                row["setting"] += f", run {i + 1} of {repeat}"
            rows.append(row)
            print(f"{mode} ε={e:g}: lower bound {row['lower_bound']:.3g} "
                  f"({row['correct']}/{row['guesses']}), {row['wall_seconds']:.0f} s", flush=True)
    command = "python -m benchmarks.bench_audit " + shlex.join(sys.argv[1:])
    out.parent.mkdir(parents=True, exist_ok=True)
    head = out.read_text(encoding="utf-8") if append and out.is_file() else "\n".join(HEADER)
    out.write_text(head.rstrip("\n") + "\n" + _markdown(rows, command.strip(), level),
                   encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    app()
