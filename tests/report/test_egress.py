"""Egress coverage: the eBPF agent's LLM connections, metered by a sidecar or not, in the report.

January 2024 from `tests/support/month.py` in a real Prometheus: two nodes' agents, rolled
out on January 2nd, scraped without honor_labels (the metric's namespace in
`exported_namespace`), node-a's agent restarted on the 20th with its series back already
counting (a reset without a zero), a workload with no sidecar and no cost (`scraper`), a
bypass (checkout to Anthropic), a pod gone on the 26th. Every expected number is counted
here from the generated connections, never by podtally's code.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import month
from support.prometheus import RunningPrometheus
from support.report_html import PageParser

from podtally.cli import main
from podtally.report.build import build_report
from podtally.report.egress import share_text
from podtally.report.formats import render_as
from podtally.report.period import Period
from report.test_output import CHECKOUT, SUMMARIZER, ListSource

JAN = ("--start", "2024-01-01", "--end", "2024-02-01")
CONTRACT_CSV = ["cost_usd", "tokens_total", *(f"tokens_{t}" for t in month.TOKEN_TYPES),
                "requests"]


@pytest.fixture(scope="module")
def prometheus(month_prometheus: RunningPrometheus) -> RunningPrometheus:
    return month_prometheus


def run(*args: str) -> str:
    result = CliRunner().invoke(main, ["report", "-q", *args])
    assert result.exit_code == 0, result.stderr
    return result.stdout


def expected(conns: list[month.Connection], key: tuple[str, ...], **period: object
             ) -> dict[tuple[str, ...], dict[str, int]]:
    want = month.connection_totals(conns, key, **period)  # type: ignore[arg-type]
    return {k: v for k, v in want.items() if any(v.values())}


def pct(part: int, whole: int) -> str:
    return f"{part / whole * 100:.1f}%"


@pytest.mark.parametrize(("by", "key"), [
    ("team", ("team",)),
    ("namespace,workload", ("namespace", "workload")),
    ("team,namespace,model", ("team", "namespace")),  # connections carry no model
    ("provider", ("provider",)),
    ("model", ("namespace", "workload")),  # nothing applies: where a sidecar is missing
], ids=["team", "namespace-workload", "default-by", "provider", "model-only"])
def test_egress_per_group_is_exact(prometheus: RunningPrometheus,
                                   connections: list[month.Connection], by: str,
                                   key: tuple[str, ...]) -> None:
    doc = json.loads(run("--prometheus-url", prometheus.url, *JAN, "--by", by,
                         "--format", "json"))
    eg = doc["egress_coverage"]
    assert eg["status"] == "ok" and tuple(eg["by"]) == key
    want = expected(connections, key)
    got = {tuple(r[k] for k in key): r for r in eg["rows"]}
    assert set(got) == set(want)
    for k, v in want.items():
        r = got[k]
        assert (r["metered_connections"], r["unmetered_connections"], r["proxy_connections"]) \
            == (v["sidecar"], v["direct"], v["proxy"]), k
        assert r["unmetered_share"] == pytest.approx(v["direct"] / (v["sidecar"] + v["direct"]))
    metered = sum(v["sidecar"] for v in want.values())
    unmetered = sum(v["direct"] for v in want.values())
    assert eg["total"]["metered_connections"] == metered
    assert eg["total"]["unmetered_connections"] == unmetered
    assert eg["share"] == pytest.approx(metered / (metered + unmetered))
    # Most unmetered first: the list of what to fix.
    unmet = [r["unmetered_connections"] for r in eg["rows"]]
    assert unmet == sorted(unmet, reverse=True)
    # The attribution coverage keeps its name and meaning beside it.
    assert set(doc["coverage"]) == {"attributed_usd", "unattributed_usd", "share"}


def test_the_month_has_what_egress_meets(connections: list[month.Connection]) -> None:
    """The data: a reset without a zero, a workload that costs nothing metered, a bypass."""
    series = month.agent_series(connections)
    drops = [name for (name, labels), samples in series.items()
             if any(0 < b[1] < a[1] for a, b in zip(samples, samples[1:], strict=False))]
    assert len(drops) >= 4
    want = expected(connections, ("workload", "provider"))
    assert want[("scraper", "openai")]["sidecar"] == 0 < want[("scraper", "openai")]["direct"]
    assert want[("checkout", "anthropic")]["direct"] > 0  # the bypass
    # Ground truth is not trivially the counters' last values (the restart).
    last = sum(samples[-1][1] for (name, labels), samples in series.items()
               if name == "podtally_llm_connections_total" and ("via", "direct") in labels)
    assert last < sum(v["direct"] for v in want.values())


def test_the_table_says_egress_coverage_apart_from_attribution(
        prometheus: RunningPrometheus, connections: list[month.Connection]) -> None:
    out = run("--prometheus-url", prometheus.url, *JAN, "--by", "team")
    want = expected(connections, ("team",))
    metered = sum(v["sidecar"] for v in want.values())
    unmetered = sum(v["direct"] for v in want.values())
    whole = metered + unmetered
    assert "Attribution coverage: " in out and "of the cost has a known team" in out
    assert (f"Egress coverage: {pct(metered, whole)} of {whole:,} connections to LLM "
            f"endpoints went through a podtally sidecar; {unmetered:,} unmetered "
            f"({pct(unmetered, whole)})") in out
    section = out[out.index("Egress coverage:"):]
    lines = {line.split()[0]: line.split() for line in section.splitlines()[1:]
             if line.strip() and line.split()[0] in {*(k[0] for k in want), "TOTAL"}}
    for (team,), v in want.items():
        assert lines[team][1:] == [f"{v['sidecar']:,}", f"{v['direct']:,}",
                                   pct(v["direct"], v["sidecar"] + v["direct"])], team
    assert lines["TOTAL"][1:] == [f"{metered:,}", f"{unmetered:,}", pct(unmetered, whole)]
    # The agent came on January 2nd: the report says its data begins after the start.
    assert "the eBPF agent's counters begin at 2024-01-02T" in section


def test_the_table_says_which_labels_connections_lack(prometheus: RunningPrometheus) -> None:
    out = run("--prometheus-url", prometheus.url, *JAN)  # --by team,namespace,model
    assert "(grouped by team, namespace: connections carry no model)" in out
    page = run("--prometheus-url", prometheus.url, *JAN, "--format", "html")
    assert "Grouped by team, namespace: connections carry no model." in page
    assert "connections carry no" not in run("--prometheus-url", prometheus.url, *JAN,
                                             "--by", "team")


def test_consecutive_periods_add_up(prometheus: RunningPrometheus,
                                    connections: list[month.Connection]) -> None:
    def totals(start: str, end: str) -> dict[str, int]:
        doc = json.loads(run("--prometheus-url", prometheus.url, "--start", start, "--end", end,
                             "--by", "workload", "--format", "json"))
        return doc["egress_coverage"]["total"]

    first, second = totals("2024-01-01", "2024-01-20"), totals("2024-01-20", "2024-02-01")
    whole = totals("2024-01-01", "2024-02-01")
    for k in ("metered_connections", "unmetered_connections", "proxy_connections"):
        assert first[k] + second[k] == whole[k]
    # The second half holds node-a's restart: still exact.
    want = expected(connections, ("workload",), start=month.START.replace(day=20))
    assert second["unmetered_connections"] == sum(v["direct"] for v in want.values())


def test_no_agent_data_is_said_not_shown_as_a_share(prometheus: RunningPrometheus) -> None:
    # January 1st: calls, but the agent was not yet rolled out.
    args = ("--prometheus-url", prometheus.url, "--start", "2024-01-01", "--end", "2024-01-02",
            "--by", "team")
    out = run(*args)
    line = next(x for x in out.splitlines() if x.startswith("Egress coverage"))
    assert "no eBPF agent data" in line and "%" not in line
    assert "metered_connections" not in out
    doc = json.loads(run(*args, "--format", "json"))["egress_coverage"]
    assert doc == {"status": "no eBPF agent data", "share": None, "by": ["team"]}
    page = run(*args, "--format", "html")
    assert 'data-card="Egress coverage (LLM connections metered)">Egress coverage (LLM ' \
           "connections metered)<b>no eBPF agent data</b>" in page
    assert 'id="egress-status"' in page and 'id="egress"' not in page


def test_records_have_no_connections(calls: list[month.Call], tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    records.write_text("\n".join(month.record_lines(calls)) + "\n")
    out = run("--records", str(records), *JAN, "--by", "team")
    assert "Egress coverage: not in usage records" in out
    doc = json.loads(run("--records", str(records), *JAN, "--format", "json"))
    assert doc["egress_coverage"]["status"] == "not in usage records"
    assert doc["egress_coverage"]["share"] is None


def test_csv_keeps_the_contracts_columns(prometheus: RunningPrometheus) -> None:
    rows = list(csv.reader(io.StringIO(run("--prometheus-url", prometheus.url, *JAN,
                                           "--by", "team", "--format", "csv"))))
    assert rows[0] == ["team", *CONTRACT_CSV]
    assert rows[-1][0] == "TOTAL" and all(len(r) == len(rows[0]) for r in rows)
    assert "connections" not in "".join(",".join(r) for r in rows)


def test_html_egress_matches_json(prometheus: RunningPrometheus) -> None:
    args = ("--prometheus-url", prometheus.url, *JAN, "--by", "namespace,workload")
    page = run(*args, "--format", "html")
    eg = json.loads(run(*args, "--format", "json"))["egress_coverage"]
    p = PageParser()
    p.feed(page)
    table = p.tables["egress"]
    assert table[0] == ["namespace", "workload", "metered_connections",
                        "unmetered_connections", "unmetered_share"]
    assert [r[:4] for r in table[1:-1]] == [
        [r["namespace"], r["workload"], str(r["metered_connections"]),
         str(r["unmetered_connections"])] for r in eg["rows"]]
    assert table[-1][2:4] == [str(eg["total"]["metered_connections"]),
                              str(eg["total"]["unmetered_connections"])]
    whole = {r["data-label"]: float(r["data-value"]) for r in p.chart_rects["egress"]}
    assert whole == {"metered": eg["total"]["metered_connections"],
                     "unmetered": eg["total"]["unmetered_connections"]}
    bars = {(r["data-group"], r["data-label"]): float(r["data-value"])
            for r in p.chart_rects["egress-by-group"]}
    for r in eg["rows"]:
        g = f"{r['namespace']} / {r['workload']}"
        assert bars[(g, "metered")] == r["metered_connections"]
        assert bars[(g, "unmetered")] == r["unmetered_connections"]
    card = re.search(r'data-card="Egress coverage \(LLM connections metered\)">[^<]*<b>([^<]+)'
                     "</b>", page)
    assert card and card.group(1) == f"{eg['share'] * 100:.1f}%"


PERIOD = Period.from_days(date(2024, 1, 2), date(2024, 1, 3))
S, H = PERIOD.start_ms, 3_600_000


def _conn(labels: dict[str, str], via: str, samples: list[tuple[int, float]]
          ) -> tuple[str, dict[str, str], list[tuple[int, float]]]:
    return "podtally_llm_connections_total", {**labels, "via": via}, samples


def test_a_share_is_never_rounded_onto_an_edge() -> None:
    assert share_text(999_999, 1_000_000) == ">99.9%"
    assert share_text(1, 1_000_000) == "<0.1%"
    assert (share_text(0, 5), share_text(5, 5), share_text(1, 3)) == ("0.0%", "100.0%", "33.3%")
    assert share_text(0, 0) == "—"


def test_the_contract_metric_is_a_cross_check() -> None:
    ident = {k: v for k, v in CHECKOUT.items() if k != "model"}
    series = [
        _conn(ident, "sidecar", [(S - H, 10), (S + H, 0), (S + 2 * H, 4)]),  # reset: 4
        _conn(ident, "direct", [(S - H, 0), (S + H, 3)]),
        ("podtally_llm_unmetered_connections_total", ident, [(S - H, 0), (S + H, 2)]),
        _conn({k: v for k, v in SUMMARIZER.items() if k != "model"}, "proxy",
              [(S, 0), (S + H, 7)]),
    ]
    report = build_report(ListSource(series), PERIOD, by=("workload",), lookback_ms=2 * H)
    doc = json.loads(render_as(report, "json"))["egress_coverage"]
    assert doc["total"] == {"metered_connections": 4, "unmetered_connections": 3,
                            "unmetered_share": 3 / 7, "proxy_connections": 7}
    assert doc["share"] == 4 / 7
    # A proxy-only group (the summarizer's sidecar legs) is listed but is no connection of
    # its own; the contract metric disagreeing with via="direct" is said, not averaged.
    assert [r["workload"] for r in doc["rows"]] == ["checkout", "summarizer"]
    stale, differ = doc["warnings"]
    assert "differ in 1 group(s)" in differ and "2 against 3" in differ
    # The agent's last sample is 22 hours before the period's end: said, not guessed at.
    assert stale.startswith("the eBPF agent's counters end at 2024-01-02T02:00:00Z, over an "
                            "hour before 2024-01-03T00:00:00Z")
    # For a period not over, "now" (--as-of) is the end that matters.
    now = datetime(2024, 1, 2, 2, 30, tzinfo=UTC)
    doc = json.loads(render_as(replace(report, as_of=now), "json"))["egress_coverage"]
    assert not any("counters end" in w for w in doc["warnings"])


def test_the_contract_counter_alone_gives_no_share() -> None:
    """Unmetered counted, metered not (no podtally_llm_connections_total): no coverage is
    made up, and the unmetered count is still said."""
    ident = {k: v for k, v in CHECKOUT.items() if k != "model"}
    series = [("podtally_llm_unmetered_connections_total", ident,
               [(S - H, 0), (S + H, 5), (S + 20 * H, 9)])]
    report = build_report(ListSource(series), PERIOD, by=("team",), lookback_ms=2 * H)
    doc = json.loads(render_as(report, "json"))["egress_coverage"]
    assert doc["status"] == "no eBPF agent data" and doc["share"] is None
    assert doc["warnings"] == ["podtally_llm_unmetered_connections_total counts 9 unmetered "
                               "connections, but without podtally_llm_connections_total the "
                               "metered ones are unknown: no coverage to show"]
    text = render_as(report, "table")
    assert "counts 9 unmetered connections" in text and "metered_connections   " not in text
    assert "counts 9 unmetered connections" in render_as(report, "html")
