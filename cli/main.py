"""The `fedtune` command line (typer + rich).

Heavy imports (torch, Flower, transformers) happen inside the commands so that `--help` and
config errors are instant.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import typer

from fedtune.cli.audit import register as register_audit_command
from fedtune.cli.certs import certs_app
from fedtune.cli.console import console, err_console
from fedtune.cli.console import fail as _fail
from fedtune.cli.deploy import register as register_deploy_commands
from fedtune.cli.export import register as register_export_command
from fedtune.cli.status import register_status_command
from fedtune.common.config import ConfigError, config_to_toml, load_config
from fedtune.common.recipe_checks import recipe_warnings, train_line

app = typer.Typer(
    help="fedtune: federated, differentially private LoRA fine-tuning of language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(certs_app, name="certs")
register_deploy_commands(app)  # server, client, demo-data
register_audit_command(app)  # audit
register_export_command(app)  # export
register_status_command(app)  # status

CONFIG_OPT = typer.Option(None, "--config", "-c", help="Run configuration (TOML).")
SET_OPT = typer.Option(
    None, "--set", "-s", help="Override a key, e.g. --set dp.target_epsilon=3 (repeatable)."
)


def _load(config: Path | None, overrides: list[str] | None):
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        _fail(str(e))


@config_app.command("show")
def config_show(config: Path | None = CONFIG_OPT, set_: list[str] | None = SET_OPT) -> None:
    """Print the effective configuration (defaults + file + overrides) as TOML."""
    cfg = _load(config, set_)
    console.print(config_to_toml(cfg), markup=False, highlight=False, soft_wrap=True)  # TOML
    for warning in recipe_warnings(cfg):  # on stderr: stdout stays valid TOML
        err_console.print(f"warning: {warning}", highlight=False, markup=False)


@app.command()
def simulate(
    config: Path | None = CONFIG_OPT,
    set_: list[str] | None = SET_OPT,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower and Ray logs."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", metavar="HOST:PORT",
        help="Run the sites on a running Ray cluster (its head's HOST:PORT, or 'auto') instead "
             "of a private Ray on this machine; default: RAY_ADDRESS if set ('local': ignore "
             "it). The cluster is left running.",
    ),
) -> None:
    """Run a federated DP-LoRA fine-tuning with N simulated sites on this machine.

    Held-out evaluation (the server evaluates the global adapter before training and after
    rounds): data.eval = FILE (same columns as data.train) is used whole unless
    data.max_eval_records caps it; without it, data.eval_fraction (0.1) of data.train is held
    out before the sites' split (seeded by data.seed), and at most 500 of those records are
    evaluated unless data.max_eval_records says otherwise. The header says how many.

    Texts longer than model.max_length tokens are cut; the run says how many and suggests a
    value (the 95th percentile of the token lengths, within the model's limit).

    Ctrl-C or SIGTERM stops the run within seconds; finished rounds stay in the run directory.
    """
    cfg = _load(config, set_)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from fedtune.cli.library_logs import quiet_libraries
    from fedtune.common.data import DataError
    from fedtune.common.models import ModelLoadError
    from fedtune.common.privacy import PrivacyBudgetError
    from fedtune.simulations.partition import PartitionError
    from fedtune.simulations.process_memory import PeakSampler, summary_line
    from fedtune.simulations.progress import RichRoundListener, eval_line, print_summary
    from fedtune.simulations.runner import measure_lengths, prepare_run, run_prepared
    from fedtune.simulations.runner import ray_address as ray_address_of

    quiet_libraries()
    user_errors = (DataError, ModelLoadError, PrivacyBudgetError, PartitionError,
                   FileExistsError, ValueError)
    try:
        prepared = prepare_run(cfg)
    except user_errors as e:
        _fail(str(e))
    cfg = prepared.cfg
    console.rule(f"fedtune simulate — {prepared.run_id}")
    console.print(
        f"model [bold]{cfg.model.name}[/bold] | {cfg.federation.num_sites} sites "
        f"({cfg.data.partition}) | {cfg.federation.rounds} rounds x {cfg.train.local_steps} "
        f"local steps | DP {'on' if cfg.dp.enabled else 'off'}"
        + (f" (target ε={cfg.dp.target_epsilon}, δ={cfg.dp.delta:g})"
           if cfg.dp.enabled and cfg.dp.noise_multiplier is None else "")
        + (f", per person (column {cfg.data.privacy_unit})" if cfg.data.person_level
           else ", per record" if cfg.dp.enabled else "")
        + f" | secure aggregation {'on' if cfg.federation.secagg else 'off'}"
    )
    console.print(eval_line(prepared.held, cfg.data.max_eval_records))
    if prepared.groups:  # a natural split: which site holds which value of the column
        console.print(f"sites by {cfg.data.partition_column}: " + ", ".join(
            f"{s.site_id} = {g}" for s, g in zip(prepared.sites, prepared.groups, strict=True)),
            highlight=False)
    console.print(train_line(cfg), highlight=False)
    for warning in recipe_warnings(cfg):
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    console.print(f"run directory: {prepared.run_dir}")
    try:
        with console.status("loading the base model (first use builds the local cache)"):
            from fedtune.common.models import ensure_cached

            ensure_cached(cfg.model.name, cfg.model.cache_dir)
            lengths = measure_lengths(prepared)
        if lengths.message():
            console.print(f"[yellow]truncation:[/yellow] {lengths.message()}", highlight=False)
        with (PeakSampler() as memory,
              RichRoundListener(console, cfg.federation.rounds, cfg.federation.num_sites) as bar):
            metrics = run_prepared(prepared, listener=bar, verbose=verbose,
                                   on_stop=partial(bar.stopped, prepared.run_dir),
                                   address=ray_address_of(ray_address))
    except user_errors as e:
        _fail(str(e))
    from fedtune.server.outcome import training_failure

    # A run in which no site trained (or fewer than min_fit_sites in every round) failed.
    failure = training_failure(metrics, cfg.federation.min_fit_sites,
                               [s.site_id for s in prepared.sites])
    if failure:
        _fail(f"{failure}\nsee {prepared.run_dir / 'metrics.jsonl'}", 1)
    print_summary(console, metrics, prepared.run_dir, cfg.dp.enabled,
                  batch_size=cfg.train.batch_size, local_steps=cfg.train.local_steps)
    if line := summary_line(memory.peaks()):
        console.print(line, highlight=False)
    finished = [m["round"] for m in metrics]
    if cfg.federation.rounds not in finished:
        _fail(f"the run stopped before round {cfg.federation.rounds}; see {prepared.run_dir}")


@app.command()
def report(
    source: Path = typer.Argument(..., help="A run directory, or one site's privacy ledger file."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output folder (default: RUN_DIR/report, or next to the ledger)."
    ),
    pdf: bool = typer.Option(True, "--pdf/--no-pdf", help="Also print a PDF (needs Chromium)."),
) -> None:
    """Privacy report for a compliance officer: JSON + self-contained HTML (+ PDF)."""
    if not source.exists():
        _fail(f"{source}: no such run directory or ledger file")
    from fedtune.report import write_report

    try:
        data, files = write_report(source, out, pdf=pdf)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    for site in data["sites"]:
        acc = site["accountant"]
        if site["delta"] is None:
            console.print(f"{site['site_id']}: no DP round in its ledger")
            continue
        console.print(
            f"{site['site_id']}: {site['records']} records, ε = {site['epsilon_total'][acc]:.4g} "
            f"(all runs, {acc.upper()}) at δ = {site['delta']:g}, "
            + ("per record" if site["privacy_unit"] == "record"
               else f"per person (column {site['privacy_unit']}, {site['persons']} persons)")
        )
    if data["central_dp"]:
        c = data["central_dp"]
        console.print(f"site-level (central DP): ε = {c['epsilon_rdp']:.4g} at δ = {c['delta']:g}")
    for w in data["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w['message']}", markup=True, highlight=False)
    console.print(f"JSON: {files.json}\nHTML: {files.html}")
    console.print(f"PDF:  {files.pdf}" if files.pdf else
                  "PDF:  not made (no Chromium found, or --no-pdf)")


if __name__ == "__main__":
    app()
