"""The report as one self-contained HTML page: inline CSS and SVG charts, no script (pure).

Opened from a file by any browser, without a server or a network: nothing is fetched. The
charts: cost by team over the days of the period (stacked bars), cost by model, the
attribution coverage, tokens by type. Then the rows (as the CSV), and with --invoice and
--budgets the chargeback and budget tables. Chart elements carry `data-` attributes with
their exact values, so a test can read back what a bar stands for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from decimal import Decimal
from html import escape

from podtally.report.build import Report
from podtally.report.chargeback import UNATTRIBUTED, UNKNOWN_TEAMS
from podtally.report.egress import Egress, share_text
from podtally.report.period import iso
from podtally.report.render import VALUE_COLUMNS, finance, money, percent, usd_dec, values
from podtally.report.rows import usd
from podtally.usage import TOKEN_TYPES

MAX_BARS = 25
MAX_TEAMS = 9  # stacked series; the rest are summed as "other teams"
# Colour-blind-safe categorical palette (Okabe–Ito, without the amber kept for unattributed).
PALETTE = ("#0072b2", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#000000", "#8c6bb1",
           "#6a8d2f", "#b2182b")
UNATTRIBUTED_COLOR = "#e69f00"
ATTRIBUTED_COLOR = "#1b7837"
OTHER_COLOR = "#9aa3b2"
# Egress: metered / unmetered connections; apart from the teams' and attribution's colours.
METERED_COLOR = "#2166ac"
UNMETERED_COLOR = "#b35806"
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#1d2330}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .4em}
.meta{color:#5b6475}
.cards{display:flex;gap:1em;flex-wrap:wrap;margin:1em 0}
.card{border:1px solid #dde1e8;border-radius:6px;padding:.6em 1em;min-width:12em}
.card b{display:block;font-size:1.5em}
table{border-collapse:collapse;margin-top:.5em;font-size:13px}
th,td{padding:.25em .55em;border-bottom:1px solid #dde1e8;text-align:left;white-space:nowrap}
.scroll{overflow-x:auto}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tfoot td{font-weight:600;border-top:2px solid #1d2330}
tr.unattributed td,tr.warn td{background:#fdf3dc}
.legend span{display:inline-block;margin-right:1.2em}
.legend i{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:-.1em}
svg text{font:12px system-ui,sans-serif;fill:#1d2330}
"""


def bar_chart(title: str, items: Sequence[tuple[str, float]], fmt: Callable[[float], str],
              color: str | Callable[[str], str], chart_id: str) -> str:
    """Horizontal bars, longest = full width; labels left, values right of each bar."""
    label_w, bar_w, value_w, row_h = 260, 380, 140, 24
    width, height = label_w + bar_w + value_w, row_h * max(1, len(items)) + 8
    top = max((v for _, v in items), default=0.0) or 1.0
    parts = [f'<svg id="{chart_id}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}">', f"<title>{escape(title)}</title>"]
    for i, (label, value) in enumerate(items):
        y = 4 + i * row_h
        w = round(bar_w * value / top, 1) if value > 0 else 0
        fill = color(label) if callable(color) else color
        short = label if len(label) <= 38 else label[:37] + "…"
        parts += [
            f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end">{escape(short)}</text>',
            f'<rect x="{label_w}" y="{y + 3}" width="{w}" height="{row_h - 6}" fill="{fill}" '
            f'data-label="{escape(label)}" data-value="{value!r}">'
            f"<title>{escape(label)}: {escape(fmt(value))}</title></rect>",
            f'<text x="{label_w + w + 6}" y="{y + 16}">{escape(fmt(value))}</text>',
        ]
    parts.append("</svg>")
    return "".join(parts)


def _top(items: list[tuple[str, float]], n: int, rest: str) -> list[tuple[str, float]]:
    if len(items) <= n:
        return items
    others = items[n - 1:]
    return [*items[:n - 1], (f"{len(others)} {rest}", sum(v for _, v in others))]


def team_colors(teams: Sequence[str]) -> dict[str, str]:
    colors, i = {}, 0
    for t in teams:
        if t in UNKNOWN_TEAMS:
            colors[t] = UNATTRIBUTED_COLOR
        elif t == "other teams":
            colors[t] = OTHER_COLOR
        else:
            colors[t] = PALETTE[i % len(PALETTE)]
            i += 1
    return colors


def daily_chart(report: Report) -> tuple[str, str]:
    """Stacked bars of cost per team per day, and its legend."""
    by_team = report.daily_cost("team")
    ranked = sorted(by_team, key=lambda t: (-sum(by_team[t]), t))
    if len(ranked) > MAX_TEAMS:
        keep, rest = ranked[:MAX_TEAMS - 1], ranked[MAX_TEAMS - 1:]
        series = {t: by_team[t] for t in keep}
        series["other teams"] = [sum(by_team[t][d] for t in rest) for d in range(report.days)]
    else:
        series = {t: by_team[t] for t in ranked}
    colors = team_colors(list(series))
    days = report.days
    left, plot_w, plot_h, top_pad, bottom = 70, 860, 260, 10, 40
    width, height = left + plot_w + 10, top_pad + plot_h + bottom
    day_totals = [sum(v[d] for v in series.values()) for d in range(days)]
    top = max(day_totals, default=0.0) or 1.0
    slot = plot_w / max(1, days)
    bar = min(40.0, max(1.0, slot * 0.75))
    parts = [f'<svg id="daily" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
             'aria-label="Cost by team per day (USD)"><title>Cost by team per day (USD)</title>']
    for k in range(5):  # gridlines at 0, 25, 50, 75, 100% of the busiest day
        y = top_pad + plot_h - plot_h * k / 4
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                     'stroke="#dde1e8"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f'${top * k / 4:,.2f}</text>')
    label_every = max(1, -(-days // 16))
    for d in range(days):
        x = left + d * slot + (slot - bar) / 2
        y = top_pad + plot_h
        day = iso(report.period.start + timedelta(days=d))[:10]
        for team, costs in series.items():
            v = costs[d]
            if v <= 0:
                continue
            h = plot_h * v / top
            y -= h
            parts.append(f'<rect x="{x:.1f}" y="{y:.2f}" width="{bar:.1f}" height="{h:.2f}" '
                         f'fill="{colors[team]}" data-team="{escape(team)}" data-day="{day}" '
                         f'data-value="{v!r}"><title>{escape(team)} {day}: '
                         f'${v:,.4f}</title></rect>')
        if d % label_every == 0:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{top_pad + plot_h + 16}" '
                         f'text-anchor="middle">{day[5:]}</text>')
    parts.append("</svg>")
    legend = '<p class="legend">' + "".join(
        f'<span><i style="background:{c}"></i>{escape(t or "(no team label)")}</span>'
        for t, c in colors.items()) + "</p>"
    return "".join(parts), legend


def coverage_chart(report: Report) -> str:
    fin = finance(report)
    cov = fin.coverage
    total = cov.total_usd
    share = cov.share
    width, bar_w, h = 800, 640, 40
    known_w = round(bar_w * share, 1) if share is not None else 0
    return (
        f'<svg id="coverage" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h + 30}" '
        f'viewBox="0 0 {width} {h + 30}" role="img" aria-label="Attribution coverage">'
        "<title>Attribution coverage</title>"
        f'<rect x="0" y="0" width="{known_w}" height="{h}" fill="{ATTRIBUTED_COLOR}" '
        f'data-label="attributed" data-value="{float(cov.attributed_usd)!r}"/>'
        f'<rect x="{known_w}" y="0" width="{round(bar_w - known_w, 1) if total else 0}" '
        f'height="{h}" fill="{UNATTRIBUTED_COLOR}" data-label="{UNATTRIBUTED}" '
        f'data-value="{float(cov.unattributed_usd)!r}"/>'
        f'<text x="{bar_w + 10}" y="{h / 2 + 5}" font-weight="600">{percent(share)} '
        "attributed</text>"
        f'<text x="0" y="{h + 20}">known team ${money(cov.attributed_usd)} · '
        f'{UNATTRIBUTED} ${money(cov.unattributed_usd)}</text></svg>')


def egress_charts(eg: Egress) -> str:
    """The whole period's connections split metered | unmetered, then a bar per group
    (most unmetered first), each split the same way; an explanation without agent data."""
    if not eg.available:
        return f'<p class="meta" id="egress-status">{escape(eg.headline())}.</p>' + "".join(
            f'<p class="meta">Warning: {escape(w)}</p>' for w in eg.warnings)
    t = eg.total
    width, bar_w, h = 800, 640, 40
    metered_w = round(bar_w * t.metered / t.connections, 1) if t.connections else 0
    unmetered_w = round(bar_w - metered_w, 1) if t.connections else 0
    whole = (
        f'<svg id="egress" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h + 30}" '
        f'viewBox="0 0 {width} {h + 30}" role="img" aria-label="Egress coverage">'
        "<title>Egress coverage: LLM connections metered by a sidecar, and unmetered</title>"
        f'<rect x="0" y="0" width="{metered_w}" height="{h}" fill="{METERED_COLOR}" '
        f'data-label="metered" data-value="{t.metered!r}"/>'
        f'<rect x="{metered_w}" y="0" width="{unmetered_w}" height="{h}" '
        f'fill="{UNMETERED_COLOR}" data-label="unmetered" data-value="{t.unmetered!r}"/>'
        f'<text x="{bar_w + 10}" y="{h / 2 + 5}" font-weight="600">'
        f"{share_text(t.metered, t.connections)} metered</text>"
        f'<text x="0" y="{h + 20}">metered {t.metered:,.0f} · unmetered {t.unmetered:,.0f} '
        "connections</text></svg>")
    shown = eg.rows[:MAX_BARS]
    label_w, plot_w, value_w, row_h = 260, 380, 200, 24
    top = max((r.connections for r in shown), default=0.0) or 1.0
    gw, gh = label_w + plot_w + value_w, row_h * max(1, len(shown)) + 8
    parts = [f'<svg id="egress-by-group" xmlns="http://www.w3.org/2000/svg" width="{gw}" '
             f'height="{gh}" viewBox="0 0 {gw} {gh}" role="img" '
             'aria-label="LLM connections by group: metered and unmetered">'
             "<title>LLM connections by group: metered and unmetered</title>"]
    for i, r in enumerate(shown):
        y = 4 + i * row_h
        name = " / ".join(g or "(none)" for g in r.group)
        short = name if len(name) <= 38 else name[:37] + "…"
        x = float(label_w)
        parts.append(f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end">'
                     f"{escape(short)}</text>")
        for kind, value, color in (("metered", r.metered, METERED_COLOR),
                                   ("unmetered", r.unmetered, UNMETERED_COLOR)):
            w = round(plot_w * value / top, 1)
            parts.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{w}" height="{row_h - 6}" '
                         f'fill="{color}" data-group="{escape(name)}" data-label="{kind}" '
                         f'data-value="{value!r}"><title>{escape(name)}: {value:,.0f} {kind}'
                         "</title></rect>")
            x += w
        parts.append(f'<text x="{x + 6:.1f}" y="{y + 16}">{r.unmetered:,.0f} unmetered '
                     f"({share_text(r.unmetered, r.connections)})</text>")
    parts.append("</svg>")
    more = (f'<p class="meta">{len(eg.rows) - len(shown)} more groups in the table.</p>'
            if len(eg.rows) > len(shown) else "")
    legend = ('<p class="legend">'
              f'<span><i class="k" style="background:{METERED_COLOR}"></i>metered (through a '
              "podtally sidecar)</span>"
              f'<span><i class="k" style="background:{UNMETERED_COLOR}"></i>unmetered (no '
              "sidecar, a bypass, or a node process)</span></p>")
    head = [*eg.by, "metered_connections", "unmetered_connections", "unmetered_share"]
    table = _table(
        "egress", head, len(eg.by),
        [([*r.group, f"{r.metered:.0f}", f"{r.unmetered:.0f}",
           share_text(r.unmetered, r.connections)], "warn" if r.unmetered else "")
         for r in eg.rows],
        [*t.group, f"{t.metered:.0f}", f"{t.unmetered:.0f}",
         share_text(t.unmetered, t.connections)])
    notes = "".join(f'<p class="meta">Warning: {escape(w)}</p>' for w in eg.warnings)
    if eg.grouping:
        notes = f'<p class="meta">{escape(eg.grouping.capitalize())}.</p>' + notes
    return (f'<p class="meta">{escape(eg.headline())}. Connections, not calls or USD: an '
            "unmetered connection's calls are in the cost above only where the eBPF agent "
            f"metered them itself.</p>{notes}{whole}{legend}{''.join(parts)}{more}"
            f"{table}")


def _table(table_id: str, head: Sequence[str], numeric_from: int,
           rows: Sequence[tuple[Sequence[str], str]], foot: Sequence[str] | None = None) -> str:
    def cells(values: Sequence[str], tag: str) -> str:
        return "".join(f'<{tag}{" class=n" if i >= numeric_from else ""}>{escape(v)}</{tag}>'
                       for i, v in enumerate(values))

    body = "\n".join(f'<tr{f" class={cls}" if cls else ""}>{cells(r, "td")}</tr>'
                     for r, cls in rows)
    foot_html = f"<tfoot><tr>{cells(foot, 'td')}</tr></tfoot>" if foot else ""
    return (f'<div class="scroll"><table id="{table_id}"><thead><tr>{cells(head, "th")}</tr>'
            f"</thead>\n<tbody>\n{body}\n</tbody>{foot_html}</table></div>")


def html_page(report: Report) -> str:
    rows = report.rows()
    total = report.total(rows)
    fin = finance(report)
    period = f"{iso(report.period.start)} – {iso(report.period.end)}"

    daily, legend = daily_chart(report)
    models = sorted(((r.group[0], r.cost_usd) for r in report.rows(("model",))),
                    key=lambda x: (-x[1], x[0]))
    model_chart = bar_chart("Cost by model (USD)", _top(models, MAX_BARS, "more models"),
                            lambda v: f"${v:,.4f}", "#44546a", "by-model")
    token_chart = bar_chart("Tokens by type", [(t, total.tokens[t]) for t in TOKEN_TYPES],
                            lambda v: f"{v:,.0f}", "#8794a8", "by-token-type")

    team_at = report.by.index("team") if "team" in report.by else None
    extra = ["charged_usd"] if report.invoices else []

    def row_cells(r_group: Sequence[str], vals: dict[str, object], charged: Decimal | None
                  ) -> list[str]:
        return [*r_group, *(str(v) for v in vals.values()),
                *([usd_dec(charged or Decimal(0))] if extra else [])]

    main = _table(
        "rows", [*report.by, *VALUE_COLUMNS, *extra], len(report.by),
        [(row_cells(r.group, values(r), fin.charged.get(r.group)),
          "unattributed" if team_at is not None and r.group[team_at] in UNKNOWN_TEAMS else "")
         for r in rows],
        row_cells(total.group, values(total), sum(fin.charged.values(), Decimal(0))))

    eg = fin.egress
    cards = [("Metered cost (list prices)", f"${money(usd(total.cost_usd))}"),
             ("Attribution coverage (cost with a known team)", percent(fin.coverage.share)),
             ("Egress coverage (LLM connections metered)",
              share_text(eg.total.metered, eg.total.connections) if eg.available
              else eg.status)]
    if report.invoices:
        cards.insert(1, ("Charged (invoices)", f"${money(sum(fin.charged.values(), Decimal(0)))}"))
    cards.append(("Requests", f"{total.requests:,.0f}"))
    cards_html = '<div class="cards">' + "".join(
        f'<div class="card" data-card="{escape(k)}">{escape(k)}<b>{escape(v)}</b></div>'
        for k, v in cards) + "</div>"

    sections = []
    if fin.variances:
        sections.append("<h2>Chargeback: invoices against the metered estimate</h2>" + _table(
            "chargeback", ["provider", "metered_usd", "invoice_usd", "variance_usd", "variance"], 1,
            [([v.provider, usd_dec(v.metered_usd),
               money(v.invoice_usd) if v.invoice_usd is not None else "none (estimate charged)",
               money(v.variance_usd), percent(v.variance_share)], "") for v in fin.variances]))
    if fin.budgets:
        sections.append(
            f"<h2>Budgets for {report.period.start:%B %Y}</h2>" + _table(
                "budgets", ["team", "actual_usd", "budget_usd", "used", "projected_usd",
                            "projected", "status"], 1,
                [([b.team, money(b.actual_usd), money(b.budget_usd), percent(b.used),
                   money(b.projected_usd), percent(b.projected_share), b.status],
                  "warn" if b.status in ("over", "projected over") else "")
                 for b in fin.budgets]))

    warnings = "".join(f'<p class="meta">Warning: {escape(w)}</p>' for w in report.warnings)
    source = f", from {escape(report.source)}" if report.source else ""
    basis = ("each provider's invoice split by metered cost" if report.invoices
             else "showback at list prices")
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
{escape(", ".join(report.by))}; {basis}; USD.</p>
{warnings}
{cards_html}
<h2>Cost by team per day</h2>
{daily}
{legend}
<h2>Attribution coverage (share of cost with a known team)</h2>
{coverage_chart(report)}
<h2>Egress coverage (LLM connections through a sidecar, from the eBPF agent)</h2>
{egress_charts(fin.egress)}
<h2>Cost by model</h2>
{model_chart}
<h2>Tokens by type</h2>
{token_chart}
<h2>Details</h2>
{main}
{"".join(sections)}
</body>
</html>
"""
