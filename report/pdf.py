"""PDF of the HTML report, printed by a headless Chromium when one is installed (else skipped)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def headless_args(browser: str, profile: str) -> list[str]:
    return [browser, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--no-first-run", f"--user-data-dir={profile}"]


def html_to_pdf(html_path: Path, pdf_path: Path, timeout: int = 120) -> Path | None:
    """Print `html_path` to `pdf_path`; None when no browser is available or printing failed."""
    browser = find_browser()
    if browser is None:
        return None
    with tempfile.TemporaryDirectory() as profile:
        args = [*headless_args(browser, profile), "--no-pdf-header-footer",
                f"--print-to-pdf={pdf_path}", html_path.resolve().as_uri()]
        try:
            subprocess.run(args, capture_output=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
    return pdf_path if pdf_path.is_file() and pdf_path.stat().st_size > 0 else None
