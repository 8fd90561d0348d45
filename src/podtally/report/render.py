"""The report as text: an aligned table, CSV (the contract's columns), JSON (pure)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from podtally.report.build import Report
from podtally.report.period import iso
from podtally.report.rows import Row, total_row, usd_text
from podtally.usage import TOKEN_TYPES

VALUE_COLUMNS = ("cost_usd", "tokens_total", *(f"tokens_{t}" for t in TOKEN_TYPES), "requests")


def count(x: float) -> int | float:
    """Counters of calls and tokens are integers; anything else is shown as it is."""
    return int(x) if float(x).is_integer() else x


def values(row: Row) -> dict[str, Any]:
    """The CSV value columns of a row, in contract order (USD as fixed-point text)."""
    return {
        "cost_usd": usd_text(row.cost_usd),
        "tokens_total": count(row.tokens_total),
        **{f"tokens_{t}": count(row.tokens[t]) for t in TOKEN_TYPES},
        "requests": count(row.requests),
    }


def render_table(rows: Sequence[Row], by: Sequence[str]) -> str:
    header = [*by, "requests", *(f"tokens_{t}" for t in TOKEN_TYPES), "tokens_total", "cost_usd"]
    body = [
        [*r.group, f"{r.requests:.0f}", *(f"{r.tokens[t]:.0f}" for t in TOKEN_TYPES),
         f"{r.tokens_total:.0f}", usd_text(r.cost_usd)]
        for r in [*rows, total_row(rows, len(by))]
    ]
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(header)]
    numeric = len(by)

    def fmt(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if i >= numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(b) for b in body[:-1]), rule, fmt(body[-1])])


def table(report: Report) -> str:
    p = report.period
    title = f"LLM usage {iso(p.start)} – {iso(p.end)} (end exclusive)"
    if report.source:
        title += f", from {report.source}"
    return f"{title}\n\n{render_table(report.rows(), report.by)}\n"


def csv_text(report: Report) -> str:
    """One row per group: the --by columns, then VALUE_COLUMNS; last, the TOTAL row."""
    rows = report.rows()
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow([*report.by, *VALUE_COLUMNS])
    for r in [*rows, report.total(rows)]:
        w.writerow([*r.group, *values(r).values()])
    return out.getvalue()


def _json_values(row: Row) -> dict[str, Any]:
    return {k: float(v) if k == "cost_usd" else v for k, v in values(row).items()}


def json_text(report: Report) -> str:
    rows = report.rows()
    doc = {
        "period": {"start": iso(report.period.start), "end": iso(report.period.end)},
        "by": list(report.by),
        "currency": "USD",
        "source": report.source,
        "rows": [{**dict(zip(report.by, r.group, strict=True)), **_json_values(r)}
                 for r in rows],
        "total": _json_values(report.total(rows)),
        "warnings": list(report.warnings),
    }
    return json.dumps(doc, indent=2) + "\n"

