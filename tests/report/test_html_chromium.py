"""The HTML report as a manager opens it: a file in headless Chromium, no server, no network.

The month's report (tests/support/month.py, from a real Prometheus) with invoices and
budgets is rendered by Chromium; the DOM it built must carry exactly the CSV's numbers (the
table, and the values behind every bar), and the screenshot must show the charts: each
team's colour over an area in proportion to its cost, the attribution coverage bar split at
its share, the egress coverage bar (the eBPF agent's connections) at its own. Set PODTALLY_SCREENSHOT_TO=docs/report-html.png to keep the screenshot
(the README's picture is made so).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageChops
from support import chromium
from support.prometheus import RunningPrometheus
from support.report_html import PageParser

from podtally.cli import main

JAN = ("--start", "2024-01-01", "--end", "2024-02-01")
INVOICES = "openai=154.20,anthropic=107.45"
BUDGETS = "teams:\n  payments: 120\n  research: 100\n  growth: 90\n"
_LEGEND = re.compile(r'<i style="background:(#[0-9a-f]{6})"></i>([^<]*)</span>')


def _rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def report(*args: str) -> str:
    result = CliRunner().invoke(main, ["report", *args])
    assert result.exit_code == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def page(month_prometheus: RunningPrometheus, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("html")
    budgets = tmp / "budgets.yaml"
    budgets.write_text(BUDGETS)
    args = ("--prometheus-url", month_prometheus.url, *JAN, "--invoice", INVOICES,
            "--budgets", str(budgets), "--by", "team", "-q")
    html = tmp / "report.html"
    report(*args, "--format", "html", "-o", str(html))
    png = chromium.screenshot(html, tmp / "report.png", width=1400, height=2300)
    if os.environ.get("PODTALLY_SCREENSHOT_TO"):  # the README's picture, cropped to the page
        shot = Image.open(png).convert("RGB")
        box = ImageChops.difference(shot, Image.new("RGB", shot.size, "white")).getbbox()
        assert box is not None
        shot.crop((0, 0, shot.width, min(shot.height, box[3] + 24))).save(
            os.environ["PODTALLY_SCREENSHOT_TO"], optimize=True)
    return {
        "html": html, "png": png, "dom": chromium.dump_dom(html),
        "csv": list(csv.DictReader(io.StringIO(report(*args, "--format", "csv")))),
        "csv_rows": list(csv.reader(io.StringIO(report(*args, "--format", "csv")))),
        "by_model": list(csv.DictReader(io.StringIO(report(
            "--prometheus-url", month_prometheus.url, *JAN, "--by", "model", "-q",
            "--format", "csv")))),
        "json": json.loads(report(*args, "--format", "json")),
    }


def parsed(page: dict[str, object]) -> PageParser:
    parser = PageParser()
    parser.feed(str(page["dom"]))
    return parser


def test_chromium_built_the_page_with_the_csvs_numbers(page: dict[str, object]) -> None:
    p = parsed(page)
    rows = page["csv_rows"]
    assert isinstance(rows, list)
    assert p.rows["thead"] == [rows[0]] and p.rows["tbody"] == rows[1:-1]
    assert p.rows["tfoot"] == [rows[-1]]
    # The charts' bars stand for the CSV's numbers.
    by_team = {r["team"]: float(r["cost_usd"]) for r in page["csv"] if r["team"] != "TOTAL"}
    daily: Counter[str] = Counter()
    for rect in p.chart_rects["daily"]:
        daily[rect["data-team"]] += float(rect["data-value"])
    assert set(daily) == set(by_team)
    assert all(abs(daily[t] - by_team[t]) < 1e-6 for t in by_team)
    models = {r["model"]: float(r["cost_usd"]) for r in page["by_model"] if r["model"] != "TOTAL"}
    bars = {r["data-label"]: float(r["data-value"]) for r in p.chart_rects["by-model"]}
    assert set(bars) == set(models) and all(abs(bars[m] - models[m]) < 1e-9 for m in models)
    cov = {r["data-label"]: float(r["data-value"]) for r in p.chart_rects["coverage"]}
    assert abs(cov["unattributed"] - by_team["unattributed"]) < 1e-9
    # Chargeback and budgets tables: the invoices, to the cent.
    charge = {r[0]: r for r in p.tables["chargeback"][1:]}
    assert charge["openai"][2] == "154.20" and charge["anthropic"][2] == "107.45"
    charged = sum(Decimal(r["charged_usd"]) for r in page["csv"] if r["team"] != "TOTAL")
    assert charged == Decimal("261.65")
    card = re.search(r'data-card="Charged \(invoices\)">Charged \(invoices\)<b>\$([0-9,.]+)</b>',
                     str(page["dom"]))
    assert card and card.group(1) == "261.65"
    budget_teams = [r[0] for r in p.tables["budgets"][1:]]
    assert set(budget_teams) == set(by_team)


def test_the_page_fetches_nothing(page: dict[str, object]) -> None:
    html = Path(str(page["html"])).read_text()
    assert "<script" not in html and "<link" not in html and "@import" not in html
    assert not re.search(r"(src|href)=|url\(", html)  # nothing to fetch: all inline


def test_the_screenshot_shows_the_charts(page: dict[str, object]) -> None:
    image = Image.open(str(page["png"])).convert("RGB")
    width, height = image.size
    pixels = Counter(image.get_flattened_data())
    legend = dict((team, color) for color, team in _LEGEND.findall(str(page["dom"])))
    by_team = {r["team"]: float(r["cost_usd"]) for r in page["csv"] if r["team"] != "TOTAL"}
    assert set(legend) == set(by_team)
    # Each team's colour covers an area in proportion to its cost (bars of equal width,
    # heights in proportion to cost; the legend swatch and anti-aliased edges aside).
    # The unattributed amber is also the coverage bar's: compare the others.
    colored = {t: pixels[_rgb(c)] for t, c in legend.items() if t != "unattributed"}
    assert all(n > 1000 for n in colored.values()), colored
    cost = {t: by_team[t] for t in colored}
    for t in colored:
        drawn = colored[t] / sum(colored.values())
        assert abs(drawn - cost[t] / sum(cost.values())) < 0.02, (t, drawn, colored)

    # The coverage bar: the row where the attributed green is widest is split at the share.
    green, amber = _rgb("#1b7837"), _rgb("#e69f00")
    best = max(range(height), key=lambda y: sum(
        image.getpixel((x, y)) == green for x in range(0, width, 4)))
    row = [image.getpixel((x, best)) for x in range(width)]
    known, unknown = row.count(green), row.count(amber)
    share = page["json"]["coverage"]["share"]
    assert known > 300 and abs(known / (known + unknown) - share) < 0.01, (known, unknown, share)


def test_the_egress_coverage_renders(page: dict[str, object]) -> None:
    """The eBPF agent's connections: the DOM holds the JSON's numbers, and the screenshot's
    bar is split metered | unmetered at the egress coverage (not the attribution one)."""
    p = parsed(page)
    eg = page["json"]["egress_coverage"]
    whole = {r["data-label"]: float(r["data-value"]) for r in p.chart_rects["egress"]}
    assert whole == {"metered": eg["total"]["metered_connections"],
                     "unmetered": eg["total"]["unmetered_connections"]}
    table = {r[0]: r[1:3] for r in p.tables["egress"][1:]}
    assert table == {**{r["team"]: [str(r["metered_connections"]),
                                    str(r["unmetered_connections"])] for r in eg["rows"]},
                     "TOTAL": [str(eg["total"]["metered_connections"]),
                               str(eg["total"]["unmetered_connections"])]}
    image = Image.open(str(page["png"])).convert("RGB")
    width, height = image.size
    metered, unmetered = _rgb("#2166ac"), _rgb("#b35806")
    best = max(range(height), key=lambda y: sum(
        image.getpixel((x, y)) == metered for x in range(0, width, 4)))
    row = [image.getpixel((x, best)) for x in range(width)]
    known, unknown = row.count(metered), row.count(unmetered)
    share = eg["share"]
    assert abs(share - page["json"]["coverage"]["share"]) > 0.05  # two different numbers
    assert known > 300 and abs(known / (known + unknown) - share) < 0.01, (known, unknown, share)
