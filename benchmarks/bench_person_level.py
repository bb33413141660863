"""Person-level vs record-level DP at the same ε on MedQuAD; writes results/person_level.md.

    python -m benchmarks.bench_person_level                       # the default configuration
    python -m benchmarks.bench_person_level --records 200 --rounds 2 --steps 4   # small

MedQuAD (../shared/datasets/medquad/medquad.jsonl, Ben Abacha & Demner-Fushman 2019) has no
patient ids. The benchmark uses its `focus` column (the disease or topic a question is about:
up to 28 question-answer pairs share one focus in the sources used here) as the person
column: every record with the same focus is one "person". That is a stand-in with the shape of
clinical data (one person, many records), not patients.

Both runs are real `fedtune simulate` runs (SmolLM2-135M-Instruct, instruction tuning of the
answer given the question) with the same sites (one per MedQuAD source: NIDDK, NINDS,
CancerGov, split by `data.partition = "column"`), the same steps and the same target ε:
- person level: `data.privacy_unit = "focus"`: Poisson sampling over foci, one clipped
  gradient per focus, ε per focus (train.batch_size = expected foci per batch);
- record level: `data.privacy_unit = "record"` with `data.person_column = "focus"`: the usual
  DP-SGD, ε per record; the report states the group-privacy bound (kε, k·e^((k−1)ε)·δ) of each
  site's largest focus (k records).
The held-out set is 10 % of the foci of those sources (seeded), none of them trained on. The
table gives the held-out loss before and after, σ and q per site, ε by the ledger, and the
record-level run's group ε for the largest person.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("FEDTUNE_DATASETS", REPO.parent / "shared" / "datasets"))
MEDQUAD = DATASETS / "medquad" / "medquad.jsonl"
SOURCES = ("NIDDK", "NINDS", "CancerGov")
PERSON = "focus"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _split(work: Path, eval_fraction: float, seed: int, per_site: int | None
           ) -> tuple[Path, Path, dict]:
    """Train and held-out files of the chosen sources, the held-out set by whole foci; at most
    about `per_site` records per source, taken as whole foci (seeded), so that every person
    keeps all of their records."""
    rows = [json.loads(x) for x in MEDQUAD.read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = [r for r in rows if r["source"] in SOURCES and r["answer"].strip()]
    foci = sorted({r[PERSON] for r in rows})
    rng = random.Random(seed)
    held = set(rng.sample(foci, max(1, int(eval_fraction * len(foci)))))
    train = [r for r in rows if r[PERSON] not in held]
    evals = [r for r in rows if r[PERSON] in held]
    if per_site is not None:
        keep: set[tuple[str, str]] = set()
        for source in SOURCES:
            mine = sorted({r[PERSON] for r in train if r["source"] == source})
            rng.shuffle(mine)
            size = {f: sum(1 for r in train if r["source"] == source and r[PERSON] == f)
                    for f in mine}
            total = 0
            for f in mine:
                if total >= per_site:
                    break
                keep.add((source, f))
                total += size[f]
        train = [r for r in train if (r["source"], r[PERSON]) in keep]
    work.mkdir(parents=True, exist_ok=True)
    for path, part in ((work / "train.jsonl", train), (work / "eval.jsonl", evals)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part),
                        encoding="utf-8")
    return work / "train.jsonl", work / "eval.jsonl", {
        "records": len(rows), "foci": len(foci), "held_foci": len(held),
        "train_records": len(train), "eval_records": len(evals)}


def _simulate(name: str, unit_sets: list[str], common: list[str], out: Path) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "fedtune", "simulate"]
    for s in [*common, f"output.dir={out}", f"output.run_name={name}", *unit_sets]:
        cmd += ["--set", s]
    start = time.time()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "160", "PYTHONWARNINGS": "ignore"})
    wall = time.time() - start
    if res.returncode != 0:
        raise SystemExit(f"{name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return collect(out / name, unit_sets), wall


def collect(run_dir: Path, unit_sets: list[str]) -> dict:
    """Held-out loss before and after, and the report's sites, of one finished run."""
    from fedtune.report.data import build_report

    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
               if x.strip()]
    evals = [m["eval"]["loss"] for m in metrics if m.get("eval")]
    sites = build_report(run_dir)["sites"]
    plan = sites[0]["runs"][-1]["plan"] or {}
    return {"name": run_dir.name, "loss_start": evals[0], "loss_end": evals[-1],
            "sites": sites, "sets": unit_sets, "rounds": plan.get("rounds"),
            "steps": plan.get("steps_per_round")}


@app.command()
def main(
    records: int = typer.Option(400, help="Records per site, about (whole foci, seeded)."),
    rounds: int = typer.Option(3, help="Federated rounds."),
    steps: int = typer.Option(8, help="Local DP-SGD steps per round."),
    batch: int = typer.Option(16, help="Expected batch of the record-level run (records)."),
    person_batch: int = typer.Option(4, help="Expected batch of the person-level run (foci)."),
    max_per_person: int = typer.Option(0, help="data.max_records_per_person (0: all)."),
    epsilon: float = typer.Option(8.0, help="Target ε of each site's run."),
    delta: float = typer.Option(1e-4, help="δ (below 1/persons at every site)."),
    max_length: int = typer.Option(96, help="model.max_length"),
    eval_records: int = typer.Option(128, help="Held-out records evaluated."),
    out: Path = typer.Option(Path("/tmp/fedtune-bench-person"), help="Run directories."),
    md: Path = typer.Option(REPO / "results" / "person_level.md", help="Results page."),
) -> None:
    if not MEDQUAD.is_file():
        raise SystemExit(f"MedQuAD not found at {MEDQUAD}")
    stamp = time.strftime("%H%M%S")
    train, held, sizes = _split(out / f"data-{stamp}", 0.1, seed=0, per_site=records)
    common = [
        "model.name=smollm2-135m-instruct", f"model.max_length={max_length}",
        f"data.train={train}", f"data.eval={held}", f"data.max_eval_records={eval_records}",
        "data.input_key=question", "data.output_key=answer", "data.partition=column",
        "data.partition_column=source",
        f"federation.num_sites={len(SOURCES)}", f"federation.rounds={rounds}",
        f"train.local_steps={steps}",
        f"dp.target_epsilon={epsilon}", f"dp.delta={delta}", "dp.reproducible_seed=true",
        "federation.report_train_loss=false",
    ]
    cap = [f"data.max_records_per_person={max_per_person}"] if max_per_person else []
    person, t_person = _simulate(f"person-{stamp}", [f"data.privacy_unit={PERSON}", *cap,
                                                     f"train.batch_size={person_batch}"],
                                 common, out)
    record, t_record = _simulate(f"record-{stamp}", [f"data.person_column={PERSON}",
                                                     f"train.batch_size={batch}"], common, out)
    command = "python -m benchmarks.bench_person_level " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    md.write_text(page(person, record, sizes, command, common, (t_person, t_record), epsilon),
                  encoding="utf-8")
    print(md.read_text(encoding="utf-8"))


GROUP_HEAD = "record level: group bound of the largest person"


def _loss_row(label: str, run: dict) -> str:
    sets = " ".join(run["sets"])
    return f"| {label}: `{sets}` | {run['loss_start']:.4f} | {run['loss_end']:.4f} |"


def _delta(d: float) -> str:
    return f"δ = {d:.2g}" if d < 1 else f"δ = {d:.2g} ≥ 1, i.e. no guarantee at all"


def page(person: dict, record: dict, sizes: dict, command: str, common: list[str],
          walls: tuple[float, float], epsilon: float) -> str:
    rows = []
    for run, unit in ((person, "per person (focus)"), (record, "per record")):
        for s in run["sites"]:
            r = next((x for x in s["runs"] if x["run_id"] == s["focus_run"]), s["runs"][-1])
            plan = r["plan"] or {}
            g = s.get("group_bound")
            group = (f"k = {g['k']}: ε = {g['group_epsilon']:.3g}, {_delta(g['group_delta'])}"
                     if g else "–")
            rows.append(f"| {run['name'].split('-')[0]} | {unit} | {s['site_id']} | "
                        f"{s['records']} | {s.get('persons') or '–'} | "
                        f"{plan.get('noise_multiplier', 0):.3g} | "
                        f"{plan.get('sample_rate', 0):.3g} | {r['epsilon_rdp']:.3g} | {group} |")
    groups = [s["group_bound"] for s in record["sites"] if s.get("group_bound")]
    worst = max(groups, key=lambda g: g["k"]) if groups else None
    settings = " ".join(c for c in common if not c.startswith(("data.train=", "data.eval=")))
    return f"""# Person-level vs record-level DP (MedQuAD, ε = {epsilon:g})

Command: `{command}` (on 2 CPU cores; wall time {walls[0] / 60:.1f} min person level,
{walls[1] / 60:.1f} min record level).

Data: MedQuAD sources {', '.join(SOURCES)} ({sizes['records']} records, {sizes['foci']} foci),
one site per source; 10 % of the foci ({sizes['held_foci']} foci, {sizes['eval_records']}
records) held out for evaluation, never trained on. **The person column is `focus`** (the
disease or topic of a question): MedQuAD has no patient ids, so each focus stands in for a
person with several records. Settings: `{settings}`.

| run | held-out loss before | held-out loss after |
|---|---|---|
{_loss_row("person level", person)}
{_loss_row("record level", record)}

| run | privacy unit | site | records | persons | σ | q | ε (RDP, ledger) | {GROUP_HEAD} |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

The record-level run's guarantee is per record; for the largest person of any site
({'k = ' + str(worst['k']) + ' records' if worst else 'none'}) group privacy gives only
{f"ε = {worst['group_epsilon']:.3g}, {_delta(worst['group_delta'])}" if worst else '–'}
(kε, k·e^((k−1)ε)·δ: Dwork & Roth 2014, §2.3). The person-level run's ε holds for every
focus as a whole. Figures from one seed (`dp.reproducible_seed = true`, for a repeatable
benchmark) and {person['rounds']} rounds × {person['steps']} steps: too small a run to rank
the two levels on utility; `fedtune report <run dir>` states the same per site.
"""


if __name__ == "__main__":
    app()
