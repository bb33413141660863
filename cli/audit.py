"""`fedtune audit`: a federated run with an auditor site, and the one-run privacy audit of
Steinke, Nasr & Jagielski (NeurIPS 2023) on it (simulations/audit.py).

Registered on the main typer app by cli/main.py. Heavy imports happen inside the command.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from fedtune.cli.console import console, err_console
from fedtune.cli.console import fail as _fail
from fedtune.common.config import ConfigError, load_config

if TYPE_CHECKING:
    from fedtune.simulations.audit import AuditResult


def show_result(result: AuditResult, run_dir: Path | None) -> None:
    """Print the audit's outcome; exit 1 when the lower bound exceeds the accountant's epsilon."""
    from fedtune.simulations.audit import MEANING

    console.print(
        f"{result.mode} audit, {result.audited}\n"
        f"  accountant ε ({result.accountant.upper()}) = {result.accountant_epsilon:.4g} "
        f"at δ = {result.delta:g}\n"
        f"  audited lower bound ε ≥ {result.lower_bound:.4g} with {result.confidence:.0%} "
        f"confidence ({result.m} canaries, {result.correct}/{result.guesses} guesses right)\n"
        f"  wall time {result.wall_seconds:.0f} s",
        highlight=False,
    )
    console.print(f"  ({MEANING})", highlight=False)
    if run_dir is not None:
        console.print(f"audit.json: {run_dir / 'audit.json'}", highlight=False)
    if not result.passed:
        err_console.print(
            f"[bold red]AUDIT FAILED:[/bold red] the audited lower bound ε ≥ "
            f"{result.lower_bound:.4g} exceeds the accountant's ε = "
            f"{result.accountant_epsilon:.4g}: the mechanism that ran leaks more than its "
            "accountant states (a DP implementation bug); do not trust the reported ε.",
            highlight=False,
        )
        raise typer.Exit(1)


def audit(
    config: Path | None = typer.Option(None, "--config", "-c", help="Run configuration (TOML)."),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help="Override a key "
                                          "(repeatable), e.g. --set dp.target_epsilon=4"),
    mode: str = typer.Option("white-box", "--mode", "-m",
                             help="white-box (gradient canaries) or black-box (canary records)."),
    canaries: int | None = typer.Option(None, "--canaries", min=2,
                                        help="Number of canaries (default 1000 white-box, "
                                        "200 black-box)."),
    confidence: float = typer.Option(0.95, "--confidence", min=0.5, max=0.9999,
                                     help="Confidence of the lower bound."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower and Ray logs."),
    site: Path | None = typer.Option(None, "--site", help="A deployed auditor site's site.toml "
                                     "([audit] white_box_canaries): audit its finished run "
                                     "--run instead of simulating one."),
    run: str | None = typer.Option(None, "--run", help="With --site: the run's name (as in its "
                                   "ledger and `fedtune report`)."),
) -> None:
    """Run a federation whose site-0 is an auditor and audit it: an empirical lower bound on ε
    next to the accountant's ε (Steinke, Nasr & Jagielski, NeurIPS 2023). With --site, audit a
    deployed auditor site's run instead."""
    if site is not None or run is not None:
        _audit_deployed_site(site, run, confidence)
        return
    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as e:
        _fail(str(e))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from fedtune.cli.library_logs import quiet_libraries
    from fedtune.common.data import DataError
    from fedtune.common.models import ModelLoadError
    from fedtune.common.privacy import PrivacyBudgetError
    from fedtune.simulations.audit import MODES, AuditError, run_audit
    from fedtune.simulations.partition import PartitionError
    from fedtune.simulations.progress import RichRoundListener

    if mode not in MODES:
        _fail(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    quiet_libraries()
    user_errors = (AuditError, DataError, ModelLoadError, PrivacyBudgetError, PartitionError,
                   FileExistsError, ValueError)
    run_dir: list[Path] = []
    console.rule(f"fedtune audit — {mode}")
    try:
        with RichRoundListener(console, cfg.federation.rounds, cfg.federation.num_sites) as bar:
            result = run_audit(cfg, mode, canaries, 1 - confidence, listener=bar,
                               verbose=verbose,
                               on_prepared=lambda p: run_dir.append(p.run_dir))
    except user_errors as e:
        _fail(str(e))
    show_result(result, run_dir[0] if run_dir else None)


def _audit_deployed_site(site: Path | None, run: str | None, confidence: float) -> None:
    """`fedtune audit --site site.toml --run RUN`: the site's own canaries, deltas and ledger."""
    if site is None or run is None:
        _fail("a deployed site's audit needs both --site SITE_TOML and --run RUN")
    from fedtune.client.site_config import load_site_config
    from fedtune.simulations.audit import AuditError, audit_site

    try:
        cfg = load_site_config(site, check_files=False)
        result = audit_site(cfg.state_dir, cfg.site_id, run, 1 - confidence)
    except (ConfigError, AuditError) as e:
        _fail(str(e))
    show_result(result, cfg.state_dir / "audit" / run)


def register(app: typer.Typer) -> None:
    app.command("audit")(audit)
