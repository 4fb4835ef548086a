"""Reports of an evaluation: JSON (numpy-safe), Markdown summary, self-contained HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from defectlens.report.json_report import dumps, to_jsonable, write_json
from defectlens.report.markdown import markdown_report, write_markdown


def write_html_report(report: dict[str, Any], run: Any, out_dir: str | Path, title: str | None = None,
                      gallery_size: int = 4) -> Path:
    """See :func:`defectlens.report.html.write_html_report` (matplotlib imported lazily)."""
    from defectlens.report.html import write_html_report as write

    return write(report, run, out_dir, title, gallery_size)


def write_reports(report: dict[str, Any], run: Any = None, *, json_path: str | Path | None = None,
                  markdown_path: str | Path | None = None, html_dir: str | Path | None = None) -> dict[str, Path]:
    """Write whichever of the JSON, Markdown and HTML reports are asked for -> {kind: path}."""
    written: dict[str, Path] = {}
    if json_path:
        written["json"] = write_json(report, json_path)
    if markdown_path:
        written["markdown"] = write_markdown(report, markdown_path)
    if html_dir:
        if run is None:
            raise ValueError("the HTML report needs the evaluation run (scores and maps)")
        written["html"] = write_html_report(report, run, html_dir)
    return written


__all__ = ["dumps", "markdown_report", "to_jsonable", "write_html_report", "write_json", "write_markdown", "write_reports"]
