"""The report as one self-contained HTML page: inline CSS and SVG bar charts, no script (pure)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from html import escape

from podtally.report.build import Report
from podtally.report.period import iso
from podtally.report.render import VALUE_COLUMNS, values
from podtally.usage import TOKEN_TYPES

MAX_BARS = 25
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#1d2330}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .4em}
.meta{color:#5b6475}
table{border-collapse:collapse;margin-top:.5em}
th,td{padding:.25em .7em;border-bottom:1px solid #dde1e8;text-align:left;white-space:nowrap}
.scroll{overflow-x:auto}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tfoot td{font-weight:600;border-top:2px solid #1d2330}
svg text{font:12px system-ui,sans-serif;fill:#1d2330}
"""


def bar_chart(title: str, items: Sequence[tuple[str, float]], fmt: Callable[[float], str],
              color: str) -> str:
    """Horizontal bars, longest = full width; labels left, values right of each bar."""
    label_w, bar_w, value_w, row_h = 260, 380, 120, 24
    width, height = label_w + bar_w + value_w, row_h * max(1, len(items)) + 8
    top = max((v for _, v in items), default=0.0) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
             f"<title>{escape(title)}</title>"]
    for i, (label, value) in enumerate(items):
        y = 4 + i * row_h
        w = round(bar_w * value / top, 1) if value > 0 else 0
        short = label if len(label) <= 38 else label[:37] + "…"
        parts += [
            f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end">{escape(short)}</text>',
            f'<rect x="{label_w}" y="{y + 3}" width="{w}" height="{row_h - 6}" fill="{color}">'
            f"<title>{escape(label)}: {escape(fmt(value))}</title></rect>",
            f'<text x="{label_w + w + 6}" y="{y + 16}">{escape(fmt(value))}</text>',
        ]
    parts.append("</svg>")
    return "".join(parts)


def _cost_items(labels: list[str], costs: list[float]) -> list[tuple[str, float]]:
    items = list(zip(labels, costs, strict=True))
    if len(items) > MAX_BARS:
        rest = items[MAX_BARS - 1:]
        items = [*items[:MAX_BARS - 1], (f"{len(rest)} more groups", sum(c for _, c in rest))]
    return items


def html_page(report: Report) -> str:
    rows = report.rows()
    total = report.total(rows)
    period = f"{iso(report.period.start)} – {iso(report.period.end)}"
    cost_chart = bar_chart(
        "Cost by group (USD)",
        _cost_items([" / ".join(r.group) or "(none)" for r in rows], [r.cost_usd for r in rows]),
        lambda v: f"${v:,.4f}", "#3b6fd8")
    token_chart = bar_chart(
        "Tokens by type", [(t, total.tokens[t]) for t in TOKEN_TYPES],
        lambda v: f"{v:,.0f}", "#2f9e6e")

    head = "".join(f"<th>{escape(b)}</th>" for b in report.by) + "".join(
        f'<th class="n">{c}</th>' for c in VALUE_COLUMNS)

    def tr(cells: Sequence[str], numbers: dict[str, object]) -> str:
        return "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "".join(
            f'<td class="n">{escape(str(v))}</td>' for v in numbers.values()) + "</tr>"

    body = "\n".join(tr(r.group, values(r)) for r in rows)
    warnings = "".join(f'<p class="meta">Prometheus warning: {escape(w)}</p>'
                       for w in report.warnings)
    source = f", from {escape(report.source)}" if report.source else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>podtally report {escape(period)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>LLM usage and cost</h1>
<p class="meta">{escape(period)} (UTC, end exclusive){source}; grouped by
{escape(", ".join(report.by))}. Exact counter increases; costs at list prices, in USD.</p>
{warnings}
<h2>Cost by group</h2>
{cost_chart}
<h2>Tokens by type</h2>
{token_chart}
<h2>Details</h2>
<div class="scroll"><table>
<thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody>
<tfoot>{tr(total.group, values(total))}</tfoot>
</table></div>
</body>
</html>
"""
