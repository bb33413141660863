"""`fedtune report`: a compliance report (JSON + self-contained HTML, PDF when possible)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedtune.report.data import build_report
from fedtune.report.pdf import html_to_pdf
from fedtune.report.render_html import render_html
from fedtune.report.run_level import (
    build_run_report,
    is_run_level,
    render_run_html,
    render_run_markdown,
)


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    html: Path
    pdf: Path | None
    markdown: Path | None = None  # the run-level report only


def write_report(source: str | Path, out_dir: str | Path | None = None,
                 pdf: bool = True) -> tuple[dict, ReportFiles]:
    """Build the report of `source` (run directory or ledger file) and write its files.

    Default output: `<run_dir>/report/`, or next to a ledger file. A coordinator's run
    directory (metrics.jsonl, no site ledger) gets the run-level report of what the sites
    reported (report/run_level.py): run_report.{json,html,md}.
    """
    source = Path(source)
    run_level = is_run_level(source)
    report = build_run_report(source) if run_level else build_report(source)
    out = Path(out_dir) if out_dir else (source / "report" if source.is_dir()
                                         else source.parent / "privacy_report")
    out.mkdir(parents=True, exist_ok=True)
    name = "run_report" if run_level else "privacy_report"
    json_path, html_path = out / f"{name}.json", out / f"{name}.html"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    html_path.write_text(render_run_html(report) if run_level else render_html(report),
                         encoding="utf-8")
    md_path = out / f"{name}.md" if run_level else None
    if md_path is not None:
        md_path.write_text(render_run_markdown(report), encoding="utf-8")
    pdf_path = html_to_pdf(html_path, out / f"{name}.pdf") if pdf else None
    return report, ReportFiles(json_path, html_path, pdf_path, md_path)


__all__ = ["ReportFiles", "build_report", "render_html", "write_report"]
