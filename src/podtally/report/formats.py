"""`--format` names to renderers (pure)."""

from __future__ import annotations

from collections.abc import Callable

from podtally.report import focus, html, render
from podtally.report.build import Report

RENDERERS: dict[str, Callable[[Report], str]] = {
    "table": render.table,
    "csv": render.csv_text,
    "json": render.json_text,
    "focus": focus.focus_csv,
    "html": html.html_page,
}
FORMATS = tuple(RENDERERS)


def render_as(report: Report, fmt: str) -> str:
    if fmt not in RENDERERS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    return RENDERERS[fmt](report)
