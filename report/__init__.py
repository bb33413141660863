"""`fedtune report`: a compliance report (JSON + self-contained HTML, PDF when possible)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedtune.report.data import build_report
from fedtune.report.pdf import html_to_pdf
from fedtune.report.render_html import render_html


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    html: Path
    pdf: Path | None


def write_report(source: str | Path, out_dir: str | Path | None = None,
                 pdf: bool = True) -> tuple[dict, ReportFiles]:
    """Build the report of `source` (run directory or ledger file) and write its files.

    Default output: `<run_dir>/report/`, or next to a ledger file.
    """
    source = Path(source)
    report = build_report(source)
    out = Path(out_dir) if out_dir else (source / "report" if source.is_dir()
                                         else source.parent / "privacy_report")
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "privacy_report.json", out / "privacy_report.html"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    html_path.write_text(render_html(report), encoding="utf-8")
    pdf_path = html_to_pdf(html_path, out / "privacy_report.pdf") if pdf else None
    return report, ReportFiles(json_path, html_path, pdf_path)


__all__ = ["ReportFiles", "build_report", "render_html", "write_report"]
