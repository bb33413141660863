"""The CLI's consoles and its one way to fail: a red message on stderr and a non-zero exit."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Exit 2 for a user error (bad input, refused configuration), 1 for a failed run."""
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    raise typer.Exit(code)
