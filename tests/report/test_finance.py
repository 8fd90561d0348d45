"""Chargeback, budgets and records on plain data: the rules Finance relies on."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from support.month import make_calls as month_calls
from support.month import record_lines

from podtally.report.budgets import Budgets, budget_lines, month_bounds, parse_budgets
from podtally.report.chargeback import parse_invoices, split
from podtally.report.formats import FORMATS, render_as
from podtally.report.period import Period
from podtally.report.usage_records import RecordError, read_records
from report.focus_spec import problems
from report.test_output import report

JAN = Period.from_days(date(2024, 1, 1), date(2024, 2, 1))


@pytest.mark.parametrize(("amount", "weights"), [
    pytest.param("100.00", {"a": 1, "b": 1, "c": 1}, id="thirds"),
    pytest.param("0.05", {"a": 3, "b": 3, "c": 3, "d": 3, "e": 3, "f": 3, "g": 1}, id="few-cents"),
    pytest.param("12345.67", {"a": Decimal("0.000000001"), "b": Decimal("99.5")}, id="tiny-weight"),
    pytest.param("0.00", {"a": 1}, id="zero-invoice"),
])
def test_split_adds_up_to_the_cent(amount: str, weights: dict[str, float]) -> None:
    w = {k: Decimal(v) for k, v in weights.items()}
    shares = split(Decimal(amount), w)
    assert sum(shares.values()) == Decimal(amount)
    total = sum(w.values())
    for k, v in shares.items():
        assert v == v.quantize(Decimal("0.01"))
        assert abs(v - Decimal(amount) * w[k] / total) < Decimal("0.01")


def test_split_needs_weight() -> None:
    with pytest.raises(ValueError, match="nothing to split"):
        split(Decimal("1.00"), {"a": Decimal(0)})


def test_parse_invoices() -> None:
    assert parse_invoices("openai=12345.67, anthropic=890") == {
        "openai": Decimal("12345.67"), "anthropic": Decimal("890.00")}


@pytest.mark.parametrize(("text", "message"), [
    ("openai", "PROVIDER=AMOUNT"), ("openai=abc", "not an amount"), ("openai=-1", "non-negative"),
    ("openai=1.234", "in cents"), ("openai=1,openai=2", "two invoices"), ("", "at least one"),
    ("openai=nan", "non-negative"),
])
def test_parse_invoices_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_invoices(text)


def test_budgets_file() -> None:
    b = parse_budgets("currency: USD\nteams:\n  payments: 1500\n  research: 80.5\n")
    assert b.monthly_usd == {"payments": Decimal(1500), "research": Decimal("80.5")}


@pytest.mark.parametrize(("text", "message"), [
    ("teams: [a, b]", "expected a mapping"), ("teams: {a: -1}", "non-negative"),
    ("teams: {a: true}", "not an amount"), ("currency: EUR\nteams: {a: 1}", "in USD"),
    ("team: {a: 1}", "expected a mapping"), ("teams: {a: 1}\nextra: 2", "unknown key"),
    ("teams: {a: [", "not valid YAML"),
])
def test_budgets_file_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_budgets(text)


def test_month_bounds() -> None:
    assert month_bounds(Period.from_days(date(2024, 12, 1), date(2025, 1, 1)))[1] == \
        datetime(2025, 1, 1, tzinfo=UTC)
    for start, end in [(date(2024, 1, 2), date(2024, 2, 1)), (date(2024, 1, 1), date(2024, 2, 2))]:
        with pytest.raises(ValueError, match="budgets are monthly"):
            month_bounds(Period.from_days(start, end))


def test_projection_is_the_run_rate_to_the_month_end() -> None:
    budgets = Budgets({"a": Decimal(100), "b": Decimal(10), "c": Decimal(50)})
    # Ten days of January, as of the 11th at 00:00: 10/31 of the month.
    lines = {b.team: b for b in budget_lines(
        {"a": Decimal(40), "b": Decimal(12), "d": Decimal(1)}, budgets, JAN,
        datetime(2024, 1, 11, tzinfo=UTC))}
    assert lines["a"].projected_usd == Decimal("124.00") and lines["a"].status == "projected over"
    assert lines["b"].status == "over" and lines["c"].status == "ok"
    assert lines["c"].actual_usd == 0 and lines["d"].status == "no budget"
    with pytest.raises(ValueError, match="after now"):
        budget_lines({}, budgets, JAN, datetime(2023, 12, 1, tzinfo=UTC))


def test_every_format_with_invoices_and_budgets_and_focus_conforms() -> None:
    r = replace(report(), invoices={"openai": Decimal("1.00"), "anthropic": Decimal("0.01")})
    for fmt in FORMATS:
        assert render_as(r, fmt)
    text = render_as(r, "focus")
    assert problems(next(csv.reader(io.StringIO(text))),
                    list(csv.DictReader(io.StringIO(text)))) == []
    rows = list(csv.DictReader(io.StringIO(text)))
    assert sum(Decimal(x["BilledCost"]) for x in rows) == Decimal("1.01")
    assert "charged_usd" in render_as(r, "csv").splitlines()[0]


def test_records_skip_what_is_not_a_record_and_say_so() -> None:
    lines = list(record_lines(month_calls()[:3100]))
    rep, stats = read_records(lines, JAN, by=("team",), source="r.jsonl")
    assert len(stats.skipped) == 3 and stats.records == 3100
    assert rep.warnings and "skipped 3 of 3103 lines" in rep.warnings[0]
    assert rep.samples == stats.in_period


@pytest.mark.parametrize(("change", "message"), [
    ({"timestamp": "2024-01-05T10:00:00"}, "has no time zone"),
    ({"timestamp": "yesterday"}, "not ISO 8601"),
    ({"team": None}, "'team' must be a string"),
    ({"tokens": [1, 2]}, "tokens must be an object"),
    ({"tokens": {"input": -5}}, "tokens.input must be a non-negative number"),
])
def test_a_broken_record_names_its_line(change: dict[str, object], message: str) -> None:
    line = json.loads(next(x for x in record_lines(month_calls()[:5]) if x.startswith("{")))
    with pytest.raises(RecordError, match=message) as err:
        read_records(["", json.dumps({**line, **change})], JAN, by=("team",), source="r.jsonl")
    assert str(err.value).startswith("r.jsonl:2:")
