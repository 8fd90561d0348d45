"""Grouping, the TOTAL row and every output format, from series given as plain data."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import date

import pytest
from support.report_html import PageParser

from podtally.report import focus
from podtally.report.build import SeriesSamples, build_report
from podtally.report.formats import FORMATS, render_as
from podtally.report.period import Period
from podtally.report.rows import aggregate, own_labels, parse_by

PERIOD = Period.from_days(date(2024, 1, 2), date(2024, 1, 3))
S = PERIOD.start_ms
H = 3_600_000

CHECKOUT = {"namespace": "shop", "workload": "checkout", "team": "payments", "app": "checkout",
            "service_account": "checkout", "provider": "openai", "model": "gpt-4o-mini"}
BATCH = {**CHECKOUT, "workload": "batch", "app": "batch", "service_account": "batch"}
# Scraped without honor_labels by a target in podtally-system: the metric's own namespace
# was renamed exported_namespace.
SUMMARIZER = {"namespace": "podtally-system", "exported_namespace": "ml", "pod": "agent-x",
              "workload": "summarizer", "team": "research", "app": "summarizer",
              "service_account": "summarizer", "provider": "anthropic",
              "model": "claude-3-5-sonnet-20240620"}


class ListSource:
    """A SampleSource over fixed series, answering like Prometheus: only samples in range."""

    def __init__(self, series: Iterable[tuple[str, Mapping[str, str], Sequence[tuple[int, float]]]]):
        self.series = list(series)

    def raw_samples(self, metric: str, start_ms: int, end_ms: int) -> Iterable[SeriesSamples]:
        for name, labels, samples in self.series:
            if name == metric:
                yield {"__name__": name, **labels}, [(t, v) for t, v in samples if start_ms <= t < end_ms]


def tokens(labels: Mapping[str, str], token_type: str, samples: list[tuple[int, float]]):
    return ("podtally_llm_tokens_total", {**labels, "token_type": token_type}, samples)


SERIES = [
    tokens(CHECKOUT, "input", [(S - H, 100), (S, 150), (S + 6 * H, 400), (S + 12 * H, 0),
                                (S + 12 * H + 60_000, 30)]),           # 50 + 250 + 0 + 30 = 330
    tokens(CHECKOUT, "output", [(S - H, 40), (S + H, 60), (S + 2 * H, 15)]),  # 20 + 15 = 35
    tokens(BATCH, "input", [(S + 10 * H, 0), (S + 11 * H, 30)]),          # zero-first birth: 30
    tokens(SUMMARIZER, "input", [(S + 8 * H, 0), (S + 9 * H, 40)]),
    tokens(SUMMARIZER, "cache_read", [(S + 8 * H, 0), (S + 9 * H, 1165)]),
    tokens(SUMMARIZER, "output", [(S + 8 * H, 0), (S + 9 * H, 221)]),
    ("podtally_llm_cost_usd_total", CHECKOUT, [(S - H, 1.0), (S + H, 1.25), (S + 2 * H, 0.5)]),  # 0.75
    ("podtally_llm_cost_usd_total", BATCH, [(S + 10 * H, 0), (S + 11 * H, 0.125)]),
    ("podtally_llm_cost_usd_total", SUMMARIZER, [(S + 8 * H, 0), (S + 9 * H, 0.0036765)]),
    ("podtally_llm_requests_total", {**CHECKOUT, "operation": "chat", "code": "200"},
     [(S - H, 10), (S + H, 15)]),
    ("podtally_llm_requests_total", {**CHECKOUT, "operation": "chat", "code": "429"},
     [(S + H, 0), (S + 2 * H, 2)]),
    ("podtally_llm_requests_total", {**SUMMARIZER, "operation": "chat", "code": "200"},
     [(S + 8 * H, 0), (S + 9 * H, 2)]),
    ("podtally_llm_requests_total", {**CHECKOUT, "model": "gpt-4o", "operation": "chat",
                                     "code": "error"}, [(S + H, 0), (S + 2 * H, 4)]),
    # Gone before the period: a baseline and nothing else; no row.
    tokens({**CHECKOUT, "team": "gone"}, "input", [(S - H, 5)]),
]


def report(by: Sequence[str] = ("team", "namespace", "model")):
    return build_report(ListSource(SERIES), PERIOD, by=by, lookback_ms=2 * H, source_name="test")


def parse_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


CSV_HEADER = ["team", "namespace", "model", "cost_usd", "tokens_total", "tokens_input",
              "tokens_cache_read", "tokens_cache_write", "tokens_output", "tokens_reasoning",
              "requests"]


def test_csv_rows_and_total() -> None:
    assert parse_csv(render_as(report(), "csv")) == [
        CSV_HEADER,
        ["payments", "shop", "gpt-4o-mini", "0.875000000", "395", "360", "0", "0", "35", "0", "7"],
        ["research", "ml", "claude-3-5-sonnet-20240620", "0.003676500", "1426", "40", "1165", "0",
         "221", "0", "2"],
        ["payments", "shop", "gpt-4o", "0.000000000", "0", "0", "0", "0", "0", "0", "4"],
        ["TOTAL", "TOTAL", "TOTAL", "0.878676500", "1821", "400", "1165", "0", "256", "0", "13"],
    ]


def test_csv_header_follows_by() -> None:
    rows = parse_csv(render_as(report(("workload", "provider")), "csv"))
    assert rows[0] == ["workload", "provider", *CSV_HEADER[3:]]
    assert [r[:2] for r in rows[1:]] == [["checkout", "openai"], ["batch", "openai"],
                                         ["summarizer", "anthropic"], ["TOTAL", "TOTAL"]]


def test_exported_label_is_the_metrics_own() -> None:
    assert own_labels({"namespace": "podtally-system", "exported_namespace": "ml"})["namespace"] == "ml"
    namespaces = [r[0] for r in parse_csv(render_as(report(("namespace",)), "csv"))[1:]]
    assert namespaces == ["shop", "ml", "TOTAL"]


def test_aggregate_ignores_other_metrics_and_unknown_token_types() -> None:
    rows = aggregate([("podtally_llm_tokens_total", {"team": "a", "token_type": "input"}, 3),
                      ("podtally_llm_tokens_total", {"team": "a", "token_type": "audio"}, 5),
                      ("podtally_llm_request_duration_seconds_sum", {"team": "a"}, 9)], ["team"])
    assert [(r.group, r.tokens_total) for r in rows] == [(("a",), 3)]


@pytest.mark.parametrize("text", ["", "team,team", "pod", "team,instance"])
def test_parse_by_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_by(text)


def test_json() -> None:
    doc = json.loads(render_as(report(), "json"))
    assert doc["period"] == {"start": "2024-01-02T00:00:00Z", "end": "2024-01-03T00:00:00Z"}
    assert doc["by"] == ["team", "namespace", "model"]
    assert doc["rows"][1] == {"team": "research", "namespace": "ml",
                              "model": "claude-3-5-sonnet-20240620", "cost_usd": 0.0036765,
                              "tokens_total": 1426, "tokens_input": 40, "tokens_cache_read": 1165,
                              "tokens_cache_write": 0, "tokens_output": 221, "tokens_reasoning": 0,
                              "requests": 2}
    assert doc["total"]["cost_usd"] == 0.8786765 and doc["total"]["requests"] == 13


def test_table_has_every_group_and_total() -> None:
    text = render_as(report(), "table")
    assert "2024-01-02T00:00:00Z – 2024-01-03T00:00:00Z" in text
    total = [line.split() for line in text.splitlines() if line.strip().startswith("TOTAL")]
    assert total == [["TOTAL"] * 3 + ["13", "400", "1,165", "0", "256", "0", "1,821",
                                      "0.878676500"]]
    assert "Attribution coverage: 100.0% of the cost has a known team" in text


def test_focus_columns_and_rows() -> None:
    rows = list(csv.DictReader(io.StringIO(render_as(report(), "focus"))))
    header = next(csv.reader(io.StringIO(render_as(report(), "focus"))))
    assert header == [*focus.COLUMNS, *focus.CUSTOM_COLUMNS]
    for col in ("BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "BillingCurrency",
                "BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd",
                "ChargeCategory", "ChargeDescription", "ConsumedQuantity", "ConsumedUnit",
                "PricingQuantity", "PricingUnit", "ServiceName", "ServiceCategory",
                "ResourceId", "ResourceName", "SkuId", "SkuPriceId", "Tags"):
        assert col in header
    # The finest grain, whatever --by says; no TOTAL; the error-only group is no charge.
    assert [(r["ResourceId"], r["SkuId"]) for r in rows] == [
        ("shop/checkout", "openai/gpt-4o-mini"), ("shop/batch", "openai/gpt-4o-mini"),
        ("ml/summarizer", "anthropic/claude-3-5-sonnet-20240620")]
    checkout = rows[0]
    assert {k: checkout[k] for k in ("BilledCost", "EffectiveCost", "ListCost", "ContractedCost",
                                     "BillingCurrency", "ChargeCategory", "ConsumedQuantity",
                                     "ConsumedUnit", "PricingQuantity", "PricingUnit",
                                     "ServiceName", "ServiceCategory", "ServiceSubcategory",
                                     "ChargePeriodStart", "ChargePeriodEnd", "BillingPeriodStart",
                                     "ResourceName", "SubAccountId", "x_Requests",
                                     "x_TokensInput", "x_TokensOutput")} == {
        "BilledCost": "0.750000000", "EffectiveCost": "0.750000000", "ListCost": "0.750000000",
        "ContractedCost": "0.750000000", "BillingCurrency": "USD", "ChargeCategory": "Usage",
        "ConsumedQuantity": "365", "ConsumedUnit": "Tokens", "PricingQuantity": "365",
        "PricingUnit": "Tokens", "ServiceName": "openai",
        "ServiceCategory": "AI and Machine Learning", "ServiceSubcategory": "Generative AI",
        "ChargePeriodStart": "2024-01-02T00:00:00Z", "ChargePeriodEnd": "2024-01-03T00:00:00Z",
        "BillingPeriodStart": "2024-01-02T00:00:00Z", "ResourceName": "checkout",
        "SubAccountId": "shop", "x_Requests": "7", "x_TokensInput": "330", "x_TokensOutput": "35"}
    assert json.loads(checkout["Tags"]) == {"app": "checkout", "namespace": "shop",
                                            "service_account": "checkout", "team": "payments",
                                            "workload": "checkout"}
    assert json.loads(rows[2]["Tags"])["namespace"] == "ml"


def test_html_page() -> None:
    page = render_as(report(), "html")
    parser = PageParser()
    parser.feed(page)
    assert parser.rows["thead"] == [CSV_HEADER]
    csv_rows = parse_csv(render_as(report(), "csv"))
    assert parser.rows["tbody"] == csv_rows[1:-1]
    assert parser.rows["tfoot"] == [csv_rows[-1]]
    # Charts: daily cost by team (a bar per team and day with cost), coverage (attributed,
    # unattributed), by model, by token type.
    assert parser.svgs == 4
    assert {k: len(v) for k, v in parser.chart_rects.items()} == {
        "daily": 2, "coverage": 2, "by-model": 3, "by-token-type": 5}
    assert "script" not in parser.tags and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")


def test_html_escapes_labels() -> None:
    evil = [tokens({**CHECKOUT, "team": "<b>x</b>"}, "input", [(S, 0), (S + 1, 5)])]
    page = render_as(build_report(ListSource(evil), PERIOD), "html")
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page


def test_every_format_renders_an_empty_report() -> None:
    empty = build_report(ListSource([]), PERIOD)
    for fmt in FORMATS:
        assert render_as(empty, fmt)
    assert parse_csv(render_as(empty, "csv"))[-1] == ["TOTAL"] * 3 + ["0.000000000"] + ["0"] * 7
