"""`fedtune export`: a finished run's adapter, or the merged model, as a Hugging Face directory
with its tokenizer and a model card (common/export.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer

from fedtune.cli.console import console
from fedtune.cli.console import fail as _fail


def register(app: typer.Typer) -> None:
    """Add `fedtune export` to the command line."""

    @app.command("export")
    def export(
        run_dir: Path = typer.Argument(..., help="A run directory (runs/<run>)."),
        out: Path = typer.Option(..., "--out", "-o", help="The folder to write (new or empty)."),
        merged: bool = typer.Option(
            False, "--merged", help="Merge the adapter into the base model's weights."),
        force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
        unfinished: bool = typer.Option(
            False, "--unfinished", help="Export the last adapter of a run that stopped early."),
        device: str = typer.Option("cpu", help="Where to load and merge: cpu, cuda or auto."),
    ) -> None:
        """Export a run's final adapter (PEFT) with its tokenizer and a model card stating the
        privacy guarantee, sites and evaluation; --merged: the merged model instead, loadable
        with AutoModelForCausalLM (or, for a classifier, see its README.md). Written to a
        temporary folder and renamed, so a crash leaves no half export."""
        if not run_dir.is_dir():
            _fail(f"{run_dir}: no such run directory")
        from transformers.utils import logging as hf_logging

        from fedtune.common.export import ExportError, export_run
        from fedtune.common.models import ModelLoadError

        hf_logging.disable_progress_bar()  # the status line says what is happening
        hf_logging.set_verbosity_error()
        warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecations

        try:
            with console.status("loading the run's model" + (" and merging" if merged else "")):
                result = export_run(run_dir, out, merged=merged, force=force,
                                    unfinished=unfinished, device=device)
        except (ExportError, ModelLoadError, FileNotFoundError, ValueError) as e:
            _fail(str(e))
        console.print(f"exported ({result.kind}): {result.out}")
        console.print(f"load with: {result.load_class}; model card: {result.out / 'README.md'}")

