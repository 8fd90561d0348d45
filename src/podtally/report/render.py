"""The report as text: an aligned table, CSV (the contract's columns), JSON (pure)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from rich import box
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from podtally.report.budgets import BudgetLine, budget_lines
from podtally.report.build import Report
from podtally.report.chargeback import (
    UNATTRIBUTED,
    UNKNOWN_TEAMS,
    Coverage,
    Variance,
    charged,
    coverage,
    variances,
)
from podtally.report.egress import Egress, EgressRow, egress, share_text
from podtally.report.period import iso
from podtally.report.rows import TOTAL, USD_QUANTUM, Row, total_row, usd, usd_text
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


@dataclass(frozen=True)
class Finance:
    """What the report says beyond the rows: coverage, chargeback, budgets."""

    coverage: Coverage
    charged: dict[tuple[str, ...], Decimal]  # by the report's groups; empty without invoices
    variances: list[Variance]  # empty without invoices
    budgets: list[BudgetLine]  # empty without budgets
    egress: Egress  # LLM connections metered vs unmetered (the eBPF agent's)


def finance(report: Report) -> Finance:
    charged_rows = charged(report, report.by)
    lines: list[BudgetLine] = []
    if report.budgets is not None:
        if report.invoices:
            actual = charged(report, ("team",))
            teams = {g[0]: v for g, v in actual.items()}
        else:
            teams = {r.group[0]: usd(r.cost_usd) for r in report.rows(("team",))}
        lines = budget_lines(teams, report.budgets, report.period,
                             report.as_of or report.period.end)
    return Finance(coverage(report), charged_rows,
                   variances(report) if report.invoices else [], lines, egress(report))


def percent(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.1f}%"


def money(x: Decimal | None) -> str:
    return "—" if x is None else f"{x:,.2f}"


def usd_dec(x: Decimal) -> str:
    """A Decimal of USD as the rows show it: `0.003676500`."""
    return f"{x.quantize(USD_QUANTUM):f}"


def _title(report: Report) -> str:
    p = report.period
    title = f"LLM usage {iso(p.start)} – {iso(p.end)} (end exclusive)"
    if report.source:
        title += f", from {report.source}"
    return title


def table_renderables(report: Report) -> list[RenderableType]:
    """The report as rich renderables: the rows, coverage, chargeback, budgets."""
    rows = report.rows()
    total = report.total(rows)
    fin = finance(report)
    t = Table(box=box.SIMPLE_HEAD, show_footer=True)
    for b in report.by:
        t.add_column(b, footer=TOTAL)
    def tokens_of(kind: str) -> Callable[[Row], str]:
        return lambda r: f"{r.tokens[kind]:,.0f}"

    numbers: list[tuple[str, Callable[[Row], str]]] = [
        ("requests", lambda r: f"{r.requests:,.0f}"),
        *((f"tokens_{k}", tokens_of(k)) for k in TOKEN_TYPES),
        ("tokens_total", lambda r: f"{r.tokens_total:,.0f}"),
        ("cost_usd", lambda r: usd_text(r.cost_usd))]
    for name, cell in numbers:
        t.add_column(name, justify="right", footer=cell(total))
    if report.invoices:
        t.add_column("charged_usd", justify="right",
                     footer=usd_dec(sum(fin.charged.values(), Decimal(0))))
    for r in rows:
        style = "yellow" if "team" in report.by and \
            r.group[report.by.index("team")] in UNKNOWN_TEAMS else None
        cells = [*r.group, *(cell(r) for _, cell in numbers)]
        if report.invoices:
            cells.append(usd_dec(fin.charged.get(r.group, Decimal(0))))
        t.add_row(*cells, style=style)
    out: list[RenderableType] = [Text(_title(report), style="bold"), t]

    cov = fin.coverage
    out.append(Text(f"Attribution coverage: {percent(cov.share)} of the cost has a known "
                    "team", style="bold"))
    c = Table(box=box.SIMPLE_HEAD)
    c.add_column("")
    c.add_column("cost_usd", justify="right")
    c.add_column("share", justify="right")
    total_usd = cov.total_usd
    c.add_row("attributed (known team)", usd_dec(cov.attributed_usd), percent(cov.share))
    c.add_row(UNATTRIBUTED, usd_dec(cov.unattributed_usd),
              percent(None if not total_usd else float(cov.unattributed_usd / total_usd)),
              style="yellow")
    out.append(c)
    out += egress_renderables(fin.egress)

    if fin.variances:
        out.append(Text("Chargeback: each invoice split over the groups by metered cost; "
                        "invoice against estimate", style="bold"))
        vt = Table(box=box.SIMPLE_HEAD)
        for name in ("provider", "metered_usd", "invoice_usd", "variance_usd", "variance"):
            vt.add_column(name, justify="left" if name == "provider" else "right")
        for x in fin.variances:
            vt.add_row(x.provider, usd_dec(x.metered_usd),
                       money(x.invoice_usd) if x.invoice_usd is not None
                       else "none: charged at the estimate",
                       money(x.variance_usd), percent(x.variance_share))
        out.append(vt)
    if fin.budgets:
        out.append(Text(f"Budgets for {report.period.start:%B %Y}: actual, and projected to "
                        "the month's end at the run rate so far", style="bold"))
        bt = Table(box=box.SIMPLE_HEAD)
        for name in ("team", "actual_usd", "budget_usd", "used", "projected_usd",
                     "projected", "status"):
            bt.add_column(name, justify="left" if name in ("team", "status") else "right")
        for line in fin.budgets:
            style = {"over": "bold red", "projected over": "yellow"}.get(line.status)
            bt.add_row(line.team, money(line.actual_usd), money(line.budget_usd),
                       percent(line.used), money(line.projected_usd),
                       percent(line.projected_share), line.status, style=style)
        out.append(bt)
    return out


def egress_renderables(eg: Egress) -> list[RenderableType]:
    """The egress coverage's headline and, with agent data, its table per group."""
    if not eg.available:
        return [Text(eg.headline() + "\n", style="bold"),
                *(Text(f"warning: {w}\n", style="yellow") for w in eg.warnings)]
    out: list[RenderableType] = [Text(eg.headline(), style="bold")]
    t = Table(box=box.SIMPLE_HEAD, show_footer=True)
    for b in eg.by:
        t.add_column(b, footer="TOTAL")

    def cells(r: EgressRow) -> list[str]:
        return [f"{r.metered:,.0f}", f"{r.unmetered:,.0f}", share_text(r.unmetered, r.connections)]

    for name, foot in zip(("metered_connections", "unmetered_connections", "unmetered_share"),
                          cells(eg.total), strict=True):
        t.add_column(name, justify="right", footer=foot)
    for r in eg.rows:
        t.add_row(*r.group, *cells(r), style="yellow" if r.unmetered else None)
    out.append(t)
    if eg.grouping:
        out.append(Text(f"({eg.grouping})"))
    out.append(Text("metered: through the pod's podtally sidecar. unmetered: no sidecar, a "
                    "destination its capture rules skip, or a node process;\ntheir calls are in "
                    "the cost above only where the eBPF agent metered them itself. Connections, "
                    "not calls or USD.\n"))
    out += [Text(f"warning: {w}\n", style="yellow") for w in eg.warnings]
    return out


def table(report: Report) -> str:
    """The terminal table as plain text (no colour), as wide as it needs."""
    buf = io.StringIO()
    console = Console(file=buf, width=1000, color_system=None, force_terminal=False,
                      highlight=False, emoji=False)
    for part in table_renderables(report):
        console.print(part)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


def csv_text(report: Report) -> str:
    """One row per group: the --by columns, then VALUE_COLUMNS (and `charged_usd` with
    invoices); last, the TOTAL row."""
    rows = report.rows()
    fin_charged = charged(report, report.by)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    extra = ["charged_usd"] if report.invoices else []
    w.writerow([*report.by, *VALUE_COLUMNS, *extra])
    for r in rows:
        w.writerow([*r.group, *values(r).values(),
                    *([usd_dec(fin_charged.get(r.group, Decimal(0)))] if extra else [])])
    total = report.total(rows)
    w.writerow([*total.group, *values(total).values(),
                *([usd_dec(sum(fin_charged.values(), Decimal(0)))] if extra else [])])
    return out.getvalue()


def _json_values(row: Row) -> dict[str, Any]:
    return {k: float(v) if k == "cost_usd" else v for k, v in values(row).items()}


def json_doc(report: Report) -> dict[str, Any]:
    rows = report.rows()
    fin = finance(report)
    cov = fin.coverage

    def row_doc(r: Row) -> dict[str, Any]:
        doc = {**dict(zip(report.by, r.group, strict=True)), **_json_values(r)}
        if report.invoices:
            doc["charged_usd"] = float(fin.charged.get(r.group, Decimal(0)))
        return doc

    total = _json_values(report.total(rows))
    if report.invoices:
        total["charged_usd"] = float(sum(fin.charged.values(), Decimal(0)))
    doc: dict[str, Any] = {
        "period": {"start": iso(report.period.start), "end": iso(report.period.end)},
        "by": list(report.by),
        "currency": "USD",
        "source": report.source,
        "rows": [row_doc(r) for r in rows],
        "total": total,
        "coverage": {"attributed_usd": float(cov.attributed_usd),
                     "unattributed_usd": float(cov.unattributed_usd),
                     "share": cov.share},
        "egress_coverage": egress_doc(fin.egress),
        "daily_cost_by_team": {
            "days": [iso(report.period.start + timedelta(days=i))[:10]
                     for i in range(report.days)],
            "teams": {team: [float(usd(v)) for v in days]
                      for team, days in sorted(report.daily_cost("team").items())},
        },
        "warnings": list(report.warnings),
    }
    if report.invoices:
        doc["chargeback"] = [
            {"provider": v.provider, "metered_usd": float(v.metered_usd),
             "invoice_usd": None if v.invoice_usd is None else float(v.invoice_usd),
             "variance_usd": None if v.variance_usd is None else float(v.variance_usd),
             "variance_share": v.variance_share} for v in fin.variances]
    if report.budgets is not None:
        doc["budgets"] = [
            {"team": b.team, "actual_usd": float(b.actual_usd),
             "budget_usd": None if b.budget_usd is None else float(b.budget_usd),
             "used": b.used, "projected_usd": float(b.projected_usd),
             "projected_share": b.projected_share, "status": b.status}
            for b in fin.budgets]
    return doc


def egress_doc(eg: Egress) -> dict[str, Any]:
    """`egress_coverage` in the JSON: not to be confused with `coverage` (attribution)."""
    doc: dict[str, Any] = {"status": eg.status, "share": eg.coverage, "by": list(eg.by)}
    if not eg.available:
        if eg.warnings:
            doc["warnings"] = list(eg.warnings)
        return doc

    def numbers(r: EgressRow) -> dict[str, Any]:
        return {"metered_connections": count(r.metered),
                "unmetered_connections": count(r.unmetered),
                "unmetered_share": r.unmetered_share,
                "proxy_connections": count(r.proxy)}

    doc["rows"] = [{**dict(zip(eg.by, r.group, strict=True)), **numbers(r)} for r in eg.rows]
    doc["total"] = numbers(eg.total)
    doc["warnings"] = list(eg.warnings)
    return doc


def json_text(report: Report) -> str:
    return json.dumps(json_doc(report), indent=2) + "\n"
