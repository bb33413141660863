"""Rich progress display and end-of-run summary for `fedtune simulate`."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedtune.common.splits import AUTO_EVAL_CAP, HeldOut
from fedtune.server.participation import describe_participation


class RichRoundListener:
    """Shows one bar over the rounds and what the federation is doing right now."""

    def __init__(self, console: Console, rounds: int, num_sites: int) -> None:
        self.rounds = rounds
        self.num_sites = num_sites
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} rounds"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task("evaluating the initial adapter", total=rounds)
        self.last_round: int | None = None  # the last round whose record is written

    def __enter__(self) -> RichRoundListener:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def round_started(self, server_round: int) -> None:
        self.progress.update(
            self.task, description=f"round {server_round}/{self.rounds}: sites training (DP-SGD)"
        )

    def stopped(self, run_dir: Path, signal_name: str) -> None:
        """Ctrl-C / SIGTERM (simulations/stopping.py): restore the terminal, say what is kept."""
        self.progress.stop()
        done = ("no round finished" if self.last_round is None
                else "before training evaluated" if self.last_round == 0
                else f"rounds 1-{self.last_round} are finished")
        self.progress.console.print(
            f"[yellow]stopped by {signal_name}[/yellow]: {done}; stopping the sites. "
            f"Kept in {run_dir} (metrics.jsonl, checkpoints/)."
        )

    def round_finished(self, record: dict) -> None:
        self.last_round = record["round"]
        warning = divergence_line(record)
        if warning:
            self.progress.console.print(warning, highlight=False)
        rnd, ev = record["round"], record.get("eval")  # none between federation.evaluate_every
        shown = ("held-out " + ", ".join(f"{k} {v:.4g}" for k, v in ev.items()) if ev
                 else "not evaluated this round")
        if rnd == 0:
            self.progress.console.log(f"before training: {shown}")
        else:
            loss = record.get("train_loss")
            trained = any(s.get("status") == "ok" for s in record.get("sites", []))
            # train_loss is opt-in at each site (common/disclosure.py)
            told = (f"train loss {loss:.4f}" if loss is not None
                    else "no train loss sent" if trained else "no site trained")
            # the sites that dropped out, declined or refused, by name and why
            who = describe_participation(record.get("participation"))
            self.progress.console.log(f"round {rnd}: {told} | {shown}"
                                      + (f" | {who}" if who else ""), markup=False)
            self.progress.update(self.task, advance=1,
                                 description=f"round {rnd}/{self.rounds} aggregated")


def _q_and_steps(site: dict, trained: int, batch_size: int | None,
                 local_steps: int | None) -> tuple[str, str]:
    """The Poisson sample rate and the DP-SGD steps a DP site's ε is computed from."""
    from fedtune.client.trainer import poisson_sample_rate

    if "noise_multiplier" not in site or not batch_size or not local_steps:
        return "-", "-"
    q = poisson_sample_rate(int(site["records"]), batch_size)
    return f"{q:.3g}", str(trained * local_steps)


def divergence_line(record: dict) -> str | None:
    """The console warning for a round whose record carries a new `divergence` finding
    (server/divergence.py); None otherwise, and on later rounds of the same divergence."""
    d = record.get("divergence")
    if not d or not d.get("first"):
        return None
    return (f"[bold red]warning: the run is diverging[/bold red] (round {record['round']}): "
            f"{d['what']}. Likely cause: {d['cause']} Hint: {d['hint']}")


def eval_line(held: HeldOut, cap: int | None) -> str:
    """The header's line on the held-out evaluation: how many records, from where."""
    n, available = len(held.records), held.available
    if n == available:
        return f"held-out evaluation: {n:,} records ({held.source}, all of them)"
    why = (f"data.max_eval_records = {cap}" if cap is not None
           else f"at most {AUTO_EVAL_CAP} without data.eval; data.max_eval_records "
                 "changes it")
    return (f"held-out evaluation: {n:,} of {available:,} records ({held.source}; {why})")


def print_summary(console: Console, metrics: list[dict], run_dir: Path, dp_enabled: bool,
                  batch_size: int | None = None, local_steps: int | None = None) -> None:
    """The held-out table, the sites' table (with DP: ε, δ, σ, the sample rate q and the
    DP-SGD steps, what ε is computed from), and where the results are."""
    if not metrics:
        console.print("[red]no round finished; see the log above[/red]")
        return
    rounds = [m for m in metrics if m["round"] > 0]
    ev = Table(title="Held-out evaluation (global adapter)")
    ev.add_column("round")
    ev.add_column("train loss (sites)")
    keys = list(metrics[0]["eval"])
    for k in keys:
        ev.add_column(k)
    for m in metrics:
        tl = m.get("train_loss")
        ev.add_row("before" if m["round"] == 0 else str(m["round"]),
                   "-" if tl is None else f"{tl:.4f}",
                   *(f"{m['eval'][k]:.4f}" if "eval" in m else "-" for k in keys))
    console.print(ev)

    last: dict[str, dict] = {}
    for m in rounds:
        for s in m["sites"]:
            last[s["site_id"]] = s
    sites = Table(title="Sites" + (" — sample-level (ε, δ)-DP per site" if dp_enabled else ""))
    for col in ("site", "records", "rounds trained", "last status", "ε (this run)", "δ", "σ",
                "q", "steps"):
        sites.add_column(col)
    for sid in sorted(last, key=lambda s: (len(s), s)):
        s = last[sid]
        trained = sum(1 for m in rounds for x in m["sites"]
                      if x["site_id"] == sid and x.get("status") == "ok")
        eps = s.get("epsilon")
        sites.add_row(
            sid, str(s.get("records", "?")), str(trained), str(s.get("status")),
            f"{eps:.3f}" if eps is not None else "no DP",
            f"{s['delta']:.0e}" if "delta" in s else "-",
            f"{s['noise_multiplier']:.3f}" if "noise_multiplier" in s else "-",
            *_q_and_steps(s, trained, batch_size, local_steps),
        )
    console.print(sites)
    for sid in sorted(last, key=lambda s: (len(s), s)):  # who refused or declined, and why
        if last[sid].get("status") not in (None, "ok") and last[sid].get("reason"):
            console.print(f"{sid}: {last[sid]['status']}: {last[sid]['reason']}", highlight=False)
    central = next((m["central_dp"] for m in reversed(rounds) if m.get("central_dp")), None)
    if central:
        console.print(f"site-level (central DP, {central['side']}-side {central['clipping']} "
                      f"clipping): ε = {central['epsilon_rdp']:.3f} at δ = {central['delta']:g}")
    first, final = metrics[0]["eval"], metrics[-1]["eval"]
    main_key = "accuracy" if "accuracy" in final else "perplexity"
    console.print(
        f"{main_key}: before {first[main_key]:.4f} -> after {final[main_key]:.4f}  "
        f"(loss {first['loss']:.4f} -> {final['loss']:.4f})"
    )
    adapter = Path(run_dir) / "adapter"
    console.print(f"final adapter (PEFT format): [bold]{adapter}[/bold]")
    console.print(f"per-round metrics: {Path(run_dir) / 'metrics.jsonl'}")
    if dp_enabled:
        console.print(f"privacy report: fedtune report {run_dir}")
