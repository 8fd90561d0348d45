"""`podtally report` against a real Prometheus serving samples at known timestamps.

The TSDB is built from OpenMetrics text with promtool. The period is 2024-01-02 (UTC); the
series cover what chargeback meets: a baseline before the period, a sample exactly at the
start and one exactly at the end, a pod restart (counter reset, zero-first again), a reset
to a non-zero value, a pod born in the period (zero-first) and gone within it, a series born
non-zero, a gap longer than --lookback, series only before or only after the period, and
the label collision of a scrape without honor_labels (the metric's namespace renamed
exported_namespace, the target's in namespace). Every number asserted is exact.
"""

from __future__ import annotations

import csv
import io
import json
import threading
from collections.abc import Iterator
from datetime import date
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.prometheus import RunningPrometheus, SeriesData
from support.report_html import PageParser
from support.sidecar import free_port

from podtally.cli import main
from podtally.report.build import build_report
from podtally.report.formats import FORMATS, render_as
from podtally.report.period import Period
from podtally.report.prometheus import PrometheusClient, PrometheusError

# `make test` installs Debian's prometheus (with promtool): these run, never skip.

T0 = 1_704_153_600  # 2024-01-02T00:00:00Z
H = 3600
DAY = 24 * H

# honorLabels: true (the chart's PodMonitor): the metric's own namespace, plus pod/instance/job.
CHECKOUT = (("app", "checkout"), ("instance", "10.0.0.7:15090"), ("job", "podtally"),
            ("model", "gpt-4o-mini"), ("namespace", "shop"), ("pod", "checkout-7d9-a"),
            ("provider", "openai"), ("service_account", "checkout"), ("team", "payments"),
            ("workload", "checkout"))
BATCH = (("app", "batch"), ("instance", "10.0.0.9:15090"), ("job", "podtally"),
         ("model", "gpt-4o-mini"), ("namespace", "shop"), ("pod", "batch-x1"),
         ("provider", "openai"), ("service_account", "batch"), ("team", "payments"),
         ("workload", "batch"))
# Without honor_labels, scraped from a target in podtally-system.
SUMMARIZER = (("app", "summarizer"), ("exported_namespace", "ml"),
              ("instance", "10.0.1.3:15091"), ("job", "podtally-agent"),
              ("model", "claude-3-5-sonnet-20240620"), ("namespace", "podtally-system"),
              ("pod", "podtally-agent-q8x"), ("provider", "anthropic"),
              ("service_account", "summarizer"), ("team", "research"), ("workload", "summarizer"))
OPS = (("app", "cron"), ("instance", "10.0.2.2:15090"), ("job", "podtally"),
       ("model", "gpt-4o-mini"), ("namespace", "ops"), ("pod", "cron-1"), ("provider", "openai"),
       ("service_account", "cron"), ("team", "ops"), ("workload", "cron"))


def _with(labels: tuple[tuple[str, str], ...], **extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({**dict(labels), **extra}.items()))


TOK, COST, REQ = "podtally_llm_tokens_total", "podtally_llm_cost_usd_total", "podtally_llm_requests_total"

SERIES: SeriesData = {
    # Born the day before (zero-first); baseline 100 half an hour before the start; 150
    # exactly at the start (+50); 400 (+250); the pod restarts: 0, then 30 (+30); 90 one
    # second before the end (+60); 1000 exactly at the end and 1100 after it are next day's.
    (TOK, _with(CHECKOUT, token_type="input")): [
        (T0 - 2 * H, 0), (T0 - H // 2, 100), (T0, 150), (T0 + 6 * H, 400), (T0 + 12 * H, 0),
        (T0 + 12 * H + 60, 30), (T0 + DAY - 1, 90), (T0 + DAY, 1000), (T0 + DAY + H, 1100)],
    # A reset to a non-zero value (the zero was never scraped): 20 + 15 + 10.
    (TOK, _with(CHECKOUT, token_type="output")): [
        (T0 - H // 2, 40), (T0 + H, 60), (T0 + 2 * H, 15), (T0 + 3 * H, 25)],
    (COST, CHECKOUT): [
        (T0 - H // 2, 1.0), (T0 + 6 * H, 1.25), (T0 + 12 * H, 0), (T0 + 12 * H + 60, 0.125),
        (T0 + DAY - 1, 0.5), (T0 + DAY, 0.75)],                                    # 0.75
    (REQ, _with(CHECKOUT, operation="chat", code="200")): [
        (T0 - H // 2, 10), (T0 + 6 * H, 13), (T0 + 12 * H, 0), (T0 + 12 * H + 60, 1),
        (T0 + DAY - 1, 2)],                                                        # 5
    (REQ, _with(CHECKOUT, operation="chat", code="429")): [(T0 + 6 * H, 0), (T0 + 6 * H + 60, 2)],
    # Calls that failed before any response: requests, no tokens, no cost.
    (REQ, _with(CHECKOUT, model="gpt-4o", operation="chat", code="error")): [
        (T0 + H, 0), (T0 + 2 * H, 4)],
    # Born in the period non-zero (no zero-first): counted from its first sample.
    (TOK, _with(BATCH, token_type="input")): [(T0 + 10 * H, 70), (T0 + 11 * H, 100)],  # 30
    (COST, BATCH): [(T0 + 10 * H, 0.5), (T0 + 11 * H, 0.625)],                        # 0.125
    (REQ, _with(BATCH, operation="chat", code="200")): [(T0 + 10 * H, 3), (T0 + 11 * H, 4)],  # 1
    # Born in the period (zero-first), gone an hour later.
    (TOK, _with(SUMMARIZER, token_type="input")): [(T0 + 8 * H, 0), (T0 + 8 * H + 60, 25),
                                                   (T0 + 9 * H, 40)],
    (TOK, _with(SUMMARIZER, token_type="cache_read")): [(T0 + 8 * H, 0), (T0 + 8 * H + 60, 1000),
                                                        (T0 + 9 * H, 1165)],
    (TOK, _with(SUMMARIZER, token_type="output")): [(T0 + 8 * H, 0), (T0 + 9 * H, 221)],
    (COST, SUMMARIZER): [(T0 + 8 * H, 0), (T0 + 9 * H, 0.0036765)],
    (REQ, _with(SUMMARIZER, operation="chat", code="200")): [(T0 + 8 * H, 0), (T0 + 9 * H, 2)],
    # Last seen 2 h before the start: beyond the default 1h lookback, within 3h.
    (TOK, _with(OPS, token_type="input")): [(T0 - 2 * H, 500), (T0 + H, 520), (T0 + 2 * H, 530)],
    (COST, OPS): [(T0 - 2 * H, 2.0), (T0 + H, 2.5), (T0 + 2 * H, 2.75)],
    (REQ, _with(OPS, operation="chat", code="200")): [(T0 - 2 * H, 7), (T0 + H, 8), (T0 + 2 * H, 9)],
    # Gone before the period; born after it.
    (TOK, _with(CHECKOUT, team="gone", token_type="input")): [(T0 - H // 2, 5)],
    (TOK, _with(CHECKOUT, team="future", token_type="input")): [(T0 + DAY + H, 0),
                                                                (T0 + DAY + 2 * H, 9)],
}

CSV_HEADER = ["team", "namespace", "model", "cost_usd", "tokens_total", "tokens_input",
              "tokens_cache_read", "tokens_cache_write", "tokens_output", "tokens_reasoning",
              "requests"]
EXPECTED_CSV = [
    CSV_HEADER,
    ["payments", "shop", "gpt-4o-mini", "0.875000000", "465", "420", "0", "0", "45", "0", "8"],
    ["ops", "ops", "gpt-4o-mini", "0.250000000", "10", "10", "0", "0", "0", "0", "1"],
    ["research", "ml", "claude-3-5-sonnet-20240620", "0.003676500", "1426", "40", "1165", "0",
     "221", "0", "2"],
    ["payments", "shop", "gpt-4o", "0.000000000", "0", "0", "0", "0", "0", "0", "4"],
    ["TOTAL", "TOTAL", "TOTAL", "1.128676500", "1901", "470", "1165", "0", "266", "0", "15"],
]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPrometheus]:
    with RunningPrometheus(SERIES, tmp_path_factory.mktemp("prometheus")) as prom:
        yield prom


def run(prom_url: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["report", "--prometheus-url", prom_url, *args])
    return result.exit_code, result.stdout, result.stderr


def report_csv(url: str, *args: str) -> list[list[str]]:
    code, out, err = run(url, "--start", "2024-01-02", "--end", "2024-01-03", "--format", "csv",
                         *args)
    assert code == 0, err
    return list(csv.reader(io.StringIO(out)))


def test_csv_is_exact(prometheus: RunningPrometheus) -> None:
    assert report_csv(prometheus.url) == EXPECTED_CSV


def test_lookback_finds_an_older_baseline(prometheus: RunningPrometheus) -> None:
    ops = [r for r in report_csv(prometheus.url, "--lookback", "3h") if r[0] == "ops"]
    assert ops == [["ops", "ops", "gpt-4o-mini", "0.750000000", "30", "30", "0", "0", "0", "0", "2"]]


def test_by_namespace_uses_the_metrics_own_label(prometheus: RunningPrometheus) -> None:
    rows = report_csv(prometheus.url, "--by", "namespace,workload,provider")
    assert rows[0][:3] == ["namespace", "workload", "provider"]
    assert [r[:4] for r in rows[1:]] == [
        ["shop", "checkout", "openai", "0.750000000"], ["ops", "cron", "openai", "0.250000000"],
        ["shop", "batch", "openai", "0.125000000"], ["ml", "summarizer", "anthropic", "0.003676500"],
        ["TOTAL", "TOTAL", "TOTAL", "1.128676500"]]


def test_consecutive_periods_add_up(prometheus: RunningPrometheus) -> None:
    def by_workload(start: str, end: str) -> dict[tuple[str, str], list[int]]:
        rows = report_csv(prometheus.url, "--start", start, "--end", end, "--by", "team,workload")
        return {(r[0], r[1]): [int(x) for x in r[3:]] for r in rows[1:]}

    day1, day2 = by_workload("2024-01-02", "2024-01-03"), by_workload("2024-01-03", "2024-01-04")
    both = by_workload("2024-01-02", "2024-01-04")
    # Input tokens: the sample exactly at the end is the next day's (+910), then +100.
    assert (day1[("payments", "checkout")][1], day2[("payments", "checkout")][1]) == (390, 1010)
    assert day2[("future", "checkout")][1] == 9
    zero = [0] * 7  # tokens_total, the five buckets, requests
    assert both == {k: [a + b for a, b in zip(day1.get(k, zero), day2.get(k, zero), strict=True)]
                    for k in both}
    assert set(both) == set(day1) | set(day2)


def test_json(prometheus: RunningPrometheus) -> None:
    code, out, _ = run(prometheus.url, "--start", "2024-01-02", "--end", "2024-01-03",
                       "--format", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["source"] == prometheus.url
    assert [(r["team"], r["model"], r["cost_usd"], r["tokens_total"], r["requests"])
            for r in doc["rows"]] == [("payments", "gpt-4o-mini", 0.875, 465, 8),
                                      ("ops", "gpt-4o-mini", 0.25, 10, 1),
                                      ("research", "claude-3-5-sonnet-20240620", 0.0036765, 1426, 2),
                                      ("payments", "gpt-4o", 0.0, 0, 4)]
    assert doc["total"] == {"cost_usd": 1.1286765, "tokens_total": 1901, "tokens_input": 470,
                            "tokens_cache_read": 1165, "tokens_cache_write": 0,
                            "tokens_output": 266, "tokens_reasoning": 0, "requests": 15}


def test_table(prometheus: RunningPrometheus) -> None:
    code, out, _ = run(prometheus.url, "--start", "2024-01-02", "--end", "2024-01-03")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("LLM usage 2024-01-02T00:00:00Z – 2024-01-03T00:00:00Z")
    total = [line.split() for line in lines if line.strip().startswith("TOTAL")]
    assert total == [["TOTAL"] * 3 + ["15", "470", "1,165", "0", "266", "0", "1,901",
                                      "1.128676500"]]


def test_focus(prometheus: RunningPrometheus, tmp_path: Path) -> None:
    out = tmp_path / "focus.csv"
    code, stdout, _ = run(prometheus.url, "--start", "2024-01-02", "--end", "2024-01-03",
                          "--format", "focus", "-o", str(out))
    assert code == 0 and stdout == ""
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [(r["SubAccountId"], r["ResourceName"], r["ServiceName"], r["SkuId"], r["BilledCost"],
             r["ConsumedQuantity"], r["x_Requests"]) for r in rows] == [
        ("shop", "checkout", "openai", "openai/gpt-4o-mini", "0.750000000", "435", "7"),
        ("ops", "cron", "openai", "openai/gpt-4o-mini", "0.250000000", "10", "1"),
        ("shop", "batch", "openai", "openai/gpt-4o-mini", "0.125000000", "30", "1"),
        ("ml", "summarizer", "anthropic", "anthropic/claude-3-5-sonnet-20240620", "0.003676500",
         "1426", "2")]
    assert {r["ChargePeriodStart"] for r in rows} == {"2024-01-02T00:00:00Z"}
    assert {r["ChargePeriodEnd"] for r in rows} == {"2024-01-03T00:00:00Z"}
    assert json.loads(rows[3]["Tags"])["namespace"] == "ml"


def test_html(prometheus: RunningPrometheus, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    code, _, _ = run(prometheus.url, "--start", "2024-01-02", "--end", "2024-01-03",
                     "--format", "html", "-o", str(out))
    assert code == 0
    parser = PageParser()
    parser.feed(out.read_text())
    assert parser.rows["thead"] == [EXPECTED_CSV[0]]
    assert parser.rows["tbody"] == EXPECTED_CSV[1:-1]
    assert parser.rows["tfoot"] == [EXPECTED_CSV[-1]]
    assert parser.svgs == 4
    assert {k: len(v) for k, v in parser.chart_rects.items()} == {
        "daily": 3, "coverage": 2, "by-model": 3, "by-token-type": 5}
    assert "script" not in parser.tags


def test_small_queries_give_the_same_report(prometheus: RunningPrometheus) -> None:
    period = Period.from_days(date(2024, 1, 2), date(2024, 1, 3))
    with PrometheusClient(prometheus.url) as whole, \
            PrometheusClient(prometheus.url, max_samples_per_query=2) as chunked:
        a, b = build_report(whole, period), build_report(chunked, period)
    assert chunked.queries > whole.queries + 10
    for fmt in FORMATS:
        assert render_as(a, fmt) == render_as(b, fmt)


def test_cli_offers_every_format() -> None:
    from podtally.cli import _REPORT_FORMATS

    assert _REPORT_FORMATS == FORMATS


def test_unreachable_prometheus_is_a_clear_error() -> None:
    code, _, err = run(f"http://127.0.0.1:{free_port()}", "--start", "2024-01-02",
                       "--end", "2024-01-03")
    assert code != 0 and "cannot reach Prometheus" in err


@pytest.mark.parametrize(("start", "end"), [("2024-01-03", "2024-01-02"),
                                            ("2024-01-02", "2024-01-02")])
def test_end_must_follow_start(start: str, end: str) -> None:
    code, _, err = run("http://127.0.0.1:1", "--start", start, "--end", end)
    assert code == 2 and "must be after" in err


def test_bad_date_and_by() -> None:
    code, _, err = run("http://127.0.0.1:1", "--start", "2024-13-01", "--end", "2024-01-02")
    assert code == 2 and "--start" in err
    code, _, err = run("http://127.0.0.1:1", "--start", "2024-01-01", "--end", "2024-01-02",
                       "--by", "team,pod")
    assert code == 2 and "pod" in err


def test_not_prometheus_is_a_clear_error(prometheus: RunningPrometheus) -> None:
    code, _, err = run(prometheus.url + "/nothing-here", "--start", "2024-01-02",
                       "--end", "2024-01-03")
    assert code == 1 and "HTTP 404" in err and "not a Prometheus API answer" in err


class _Refusing(BaseHTTPRequestHandler):
    """Answers as Prometheus does when it refuses a query (HTTP 422, status error)."""

    def do_POST(self) -> None:  # noqa: N802
        body = json.dumps({"status": "error", "errorType": "execution",
                           "error": "query processing would load too many samples into memory"
                           }).encode()
        self.send_response(422)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_prometheus_error_answer_is_a_clear_error() -> None:
    server = HTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        code, _, err = run(url, "--start", "2024-01-02", "--end", "2024-01-03")
        assert code == 1 and "execution: query processing would load too many samples" in err
        with PrometheusClient(url) as client, pytest.raises(PrometheusError, match="refused"):
            client.query("up", 0)
    finally:
        server.shutdown()
        server.server_close()


def test_url_must_be_http() -> None:
    code, _, err = run("localhost:9090", "--start", "2024-01-02", "--end", "2024-01-03")
    assert code == 1 and "not an http(s) URL" in err
