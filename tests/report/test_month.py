"""A month of usage, as a Finance user meets it: `podtally report` against a real Prometheus.

January 2024 from `tests/support/month.py`: five long-lived pods and a nightly Job pod,
scraped every 5 minutes, backfilled with `promtool tsdb create-blocks-from openmetrics`,
with counter resets (two restarts exposed at 0 first, one whose first scrape already held
calls), a team-less notebook, samples before and after the month. Every expected number is
summed here from the generated calls, never by podtally's code.
"""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from support import month
from support.prometheus import RunningPrometheus

from podtally.cli import main
from report.focus_spec import problems

JAN = ("--start", "2024-01-01", "--end", "2024-02-01")
COST_TOL = 1e-8  # the counters hold float sums; rows are rounded to 1e-9 USD
KNOWN = ("payments", "research", "growth")


@pytest.fixture(scope="module")
def prometheus(month_prometheus: RunningPrometheus) -> RunningPrometheus:
    return month_prometheus


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["report", *args])
    return result.exit_code, result.stdout, result.stderr


def csv_rows(*args: str) -> list[dict[str, str]]:
    code, out, err = run(*args, "--format", "csv")
    assert code == 0, err
    return list(csv.DictReader(io.StringIO(out)))


def test_the_month_has_what_chargeback_meets(prometheus: RunningPrometheus) -> None:
    """The data itself, asked of Prometheus: counter resets, and series born and gone."""
    def ask(q: str) -> list[dict[str, object]]:
        r = httpx.post(f"{prometheus.url}/api/v1/query",
                       data={"query": q, "time": "1706745600"}).json()
        return r["data"]["result"]

    resets = {r["metric"]["workload"]: float(r["value"][1]) for r in ask(
        'sum by (workload) (resets(podtally_llm_cost_usd_total[32d]))')}
    assert resets["checkout"] == 4 and resets["summarizer"] == 1  # 2 restarts × 2 models
    pods = ask('count(count by (pod) (count_over_time(podtally_llm_cost_usd_total'
               '{workload="invoice-batch"}[32d])))')
    assert float(pods[0]["value"][1]) == 31


def test_month_by_team_namespace_model_is_exact(prometheus: RunningPrometheus,
                                                calls: list[month.Call]) -> None:
    key = ("team", "namespace", "model")
    want = month.totals(calls, key)
    rows = csv_rows("--prometheus-url", prometheus.url, *JAN, "--by", ",".join(key))
    got = {tuple(r[k] for k in key): r for r in rows if r["team"] != "TOTAL"}
    assert set(got) == set(want)
    for k, t in want.items():
        r = got[k]
        assert [int(r[f"tokens_{x}"]) for x in month.TOKEN_TYPES] == \
            [t.tokens[x] for x in month.TOKEN_TYPES], k
        assert int(r["tokens_total"]) == t.tokens_total and int(r["requests"]) == t.requests
        assert abs(float(r["cost_usd"]) - t.cost_usd) < COST_TOL, k
    total = rows[-1]
    assert total["team"] == "TOTAL"
    assert int(total["requests"]) == sum(t.requests for t in want.values())
    assert int(total["tokens_total"]) == sum(t.tokens_total for t in want.values())
    assert abs(float(total["cost_usd"]) - sum(t.cost_usd for t in want.values())) < 1e-6


@pytest.mark.parametrize("label", ["team", "namespace", "app", "workload", "model", "provider"])
def test_month_by_each_label(prometheus: RunningPrometheus, calls: list[month.Call],
                             label: str) -> None:
    want = month.totals(calls, (label,))
    rows = csv_rows("--prometheus-url", prometheus.url, *JAN, "--by", label)
    got = {r[label]: r for r in rows[:-1]}
    assert set(got) == {k[0] for k in want}
    for (k,), t in want.items():
        assert int(got[k]["tokens_total"]) == t.tokens_total
        assert abs(float(got[k]["cost_usd"]) - t.cost_usd) < COST_TOL
    # Most expensive first.
    costs = [float(r["cost_usd"]) for r in rows[:-1]]
    assert costs == sorted(costs, reverse=True)


def test_unattributed_row_and_coverage(prometheus: RunningPrometheus,
                                       calls: list[month.Call]) -> None:
    by_team = month.totals(calls, ("team",))
    total = sum(t.cost_usd for t in by_team.values())
    known = sum(t.cost_usd for (team,), t in by_team.items() if team in KNOWN)
    code, out, _ = run("--prometheus-url", prometheus.url, *JAN, "--by", "team",
                       "--format", "json")
    assert code == 0
    doc = json.loads(out)
    assert abs(doc["coverage"]["share"] - known / total) < 1e-9
    assert abs(doc["coverage"]["unattributed_usd"] - by_team[("unattributed",)].cost_usd) < 1e-8
    assert "unattributed" in [r["team"] for r in doc["rows"]]
    code, out, _ = run("--prometheus-url", prometheus.url, *JAN, "--by", "model")
    assert code == 0
    assert f"Attribution coverage: {known / total * 100:.1f}% of the cost has a known team" in out
    unattributed = [line.split() for line in out.splitlines()
                    if line.strip().startswith("unattributed")]
    assert unattributed and unattributed[0][1] == f"{by_team[('unattributed',)].cost_usd:.9f}"


def test_daily_cost_by_team(prometheus: RunningPrometheus, calls: list[month.Call]) -> None:
    code, out, _ = run("--prometheus-url", prometheus.url, *JAN, "--format", "json")
    assert code == 0
    daily = json.loads(out)["daily_cost_by_team"]
    assert daily["days"][0] == "2024-01-01" and daily["days"][-1] == "2024-01-31"
    want = month.daily_cost(calls, "team")
    assert set(daily["teams"]) == set(want)
    for team, days in want.items():
        assert all(abs(a - b) < 1e-8 for a, b in zip(daily["teams"][team], days, strict=True))
    # The chargeback-relevant detail: the Job team's cost comes every night.
    assert all(v > 0 for v in daily["teams"]["payments"])


def invoices_for(calls: list[month.Call]) -> dict[str, Decimal]:
    """What the providers billed: the metered cost plus a few per cent, in cents."""
    by_provider = month.totals(calls, ("provider",))
    return {"openai": (Decimal(by_provider[("openai",)].cost_usd) * Decimal("1.031"))
            .quantize(Decimal("0.01")),
            "anthropic": (Decimal(by_provider[("anthropic",)].cost_usd) * Decimal("0.987"))
            .quantize(Decimal("0.01"))}


def test_chargeback_splits_each_invoice_by_metered_cost(prometheus: RunningPrometheus,
                                                        calls: list[month.Call]) -> None:
    invoices = invoices_for(calls)
    flag = ",".join(f"{p}={v}" for p, v in invoices.items())
    rows = csv_rows("--prometheus-url", prometheus.url, *JAN, "--by", "team", "--invoice", flag)
    by_tp = month.totals(calls, ("team", "provider"))
    by_p = month.totals(calls, ("provider",))
    charged = {r["team"]: Decimal(r["charged_usd"]) for r in rows[:-1]}
    # Exactly the invoices, to the cent, over the teams.
    assert sum(charged.values()) == sum(invoices.values()) == Decimal(rows[-1]["charged_usd"])
    for team in charged:
        exact = sum(float(invoices[p]) * by_tp[(team, p)].cost_usd / by_p[(p,)].cost_usd
                    for p in invoices if (team, p) in by_tp)
        assert abs(float(charged[team]) - exact) <= 0.01 * len(invoices), team
        assert charged[team] == charged[team].quantize(Decimal("0.01"))

    code, out, _ = run("--prometheus-url", prometheus.url, *JAN, "--by", "team",
                       "--invoice", flag, "--format", "json")
    assert code == 0
    variance = {v["provider"]: v for v in json.loads(out)["chargeback"]}
    for p, inv in invoices.items():
        metered = by_p[(p,)].cost_usd
        assert variance[p]["invoice_usd"] == float(inv)
        assert abs(variance[p]["variance_usd"] - (float(inv) - metered)) < 1e-6
        assert abs(variance[p]["variance_share"] - (float(inv) - metered) / metered) < 1e-6


def test_chargeback_in_focus(prometheus: RunningPrometheus, calls: list[month.Call],
                             tmp_path: Path) -> None:
    invoices = invoices_for(calls)
    out = tmp_path / "focus.csv"
    code, stdout, _ = run("--prometheus-url", prometheus.url, *JAN, "--format", "focus",
                          "--invoice", ",".join(f"{p}={v}" for p, v in invoices.items()),
                          "-o", str(out))
    assert code == 0 and stdout == ""
    text = out.read_text()
    header = next(csv.reader(io.StringIO(text)))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert problems(header, rows) == []
    for p, inv in invoices.items():
        assert sum(Decimal(r["BilledCost"]) for r in rows if r["ProviderName"] == p) == inv
        metered = month.totals(calls, ("provider",))[(p,)].cost_usd
        assert abs(sum(float(r["ListCost"]) for r in rows if r["ProviderName"] == p)
                   - metered) < 1e-6
    # A charge per day: every day of January, each within it.
    assert {r["ChargePeriodStart"][:10] for r in rows} == {f"2024-01-{d:02d}" for d in
                                                           range(1, 32)}
    assert {r["BillingPeriodStart"] for r in rows} == {"2024-01-01T00:00:00Z"}
    tokens = month.totals(calls, ("workload",))
    for (workload,), t in tokens.items():
        assert sum(int(r["ConsumedQuantity"]) for r in rows
                   if r["ResourceName"] == workload) == t.tokens_total


def test_budgets_and_month_end_projection(prometheus: RunningPrometheus,
                                          calls: list[month.Call], tmp_path: Path) -> None:
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("currency: USD\nteams:\n  payments: 40\n  research: 5\n  growth: 500\n"
                       "  platform: 100\n")
    # Month to date: the first 15 days of January.
    first_half = month.totals(calls, ("team",), end=month.START.replace(day=16))
    code, out, err = run("--prometheus-url", prometheus.url, "--start", "2024-01-01",
                         "--end", "2024-01-16", "--budgets", str(budgets), "--format", "json")
    assert code == 0, err
    lines = {b["team"]: b for b in json.loads(out)["budgets"]}
    limits = {"payments": 40, "research": 5, "growth": 500, "platform": 100}
    assert set(lines) == {t for (t,) in first_half} | set(limits)
    for team, line in lines.items():
        actual = first_half[(team,)].cost_usd if (team,) in first_half else 0.0
        projected = actual * 31 / 15
        assert abs(line["actual_usd"] - actual) < 1e-8
        assert abs(line["projected_usd"] - projected) <= 0.005 + 1e-9
        assert line["budget_usd"] == limits.get(team)
        status = ("no budget" if team not in limits else "over" if actual > limits[team]
                  else "projected over" if round(projected, 2) > limits[team] else "ok")
        assert line["status"] == status, (team, actual, projected)
    assert {line["status"] for line in lines.values()} >= {"ok", "no budget"}

    code, out, _ = run("--prometheus-url", prometheus.url, "--start", "2024-01-01",
                       "--end", "2024-01-16", "--budgets", str(budgets))
    assert code == 0 and "Budgets for January 2024" in out and "projected" in out


def test_budgets_need_a_calendar_month(prometheus: RunningPrometheus, tmp_path: Path) -> None:
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("teams: {payments: 40}\n")
    code, _, err = run("--prometheus-url", prometheus.url, "--start", "2024-01-05",
                       "--end", "2024-02-01", "--budgets", str(budgets))
    assert code == 2 and "budgets are monthly" in err
    budgets.write_text("teams: {payments: lots}\n")
    code, _, err = run("--prometheus-url", prometheus.url, *JAN, "--budgets", str(budgets))
    assert code == 2 and "not an amount" in err


def test_records_reconcile_with_prometheus(prometheus: RunningPrometheus,
                                           calls: list[month.Call], tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    records.write_text("\n".join(month.record_lines(calls)) + "\n")
    key = ("team", "workload")
    code, out, err = run("--records", str(records), *JAN, "--by", ",".join(key),
                         "--format", "csv")
    assert code == 0, err
    # The three lines that are not records are counted and shown, never silently dropped.
    assert "skipped 3 of" in err and "lines that are not usage records" in err
    from_records = {(r["team"], r["workload"]): r for r in csv.DictReader(io.StringIO(out))
                    if r["team"] != "TOTAL"}
    want = month.totals(calls, key, by_scrape=False)  # by the call's own time
    assert set(from_records) == set(want)
    for k, t in want.items():
        assert int(from_records[k]["tokens_total"]) == t.tokens_total
        assert int(from_records[k]["requests"]) == t.requests
        assert abs(float(from_records[k]["cost_usd"]) - t.cost_usd) < COST_TOL

    # Reconciliation: Prometheus and the records differ by exactly the calls at the edges
    # of the month (made before midnight, scraped after).
    from_prom = {(r["team"], r["workload"]): r for r in
                 csv_rows("--prometheus-url", prometheus.url, *JAN, "--by", ",".join(key))[:-1]}
    edge = [c for c in calls if (month.START <= c.at < month.END)
            != (month.START <= c.scraped_at < month.END)]
    assert edge  # the data has such calls
    for k in set(from_prom) | set(from_records):
        moved = sum((1 if month.START <= c.at < month.END else -1) * sum(c.tokens.values())
                    for c in edge if (c.pod.team, c.pod.workload) == k)
        assert int(from_records[k]["tokens_total"]) - int(from_prom[k]["tokens_total"]) == moved


def test_a_broken_record_is_an_error(tmp_path: Path, calls: list[month.Call]) -> None:
    good = next(line for line in month.record_lines(calls) if line.startswith("{"))
    bad = json.loads(good)
    del bad["cost_usd"]
    records = tmp_path / "records.jsonl"
    records.write_text(good + "\n" + json.dumps(bad) + "\n")
    code, _, err = run("--records", str(records), *JAN)
    assert code == 1 and f"{records}:2: cost_usd must be a non-negative number" in err


def test_records_outside_the_period_are_a_clear_error(tmp_path: Path,
                                                      calls: list[month.Call]) -> None:
    records = tmp_path / "records.jsonl"
    records.write_text("\n".join(month.record_lines(calls[:50])) + "\n")
    code, _, err = run("--records", str(records), "--start", "2023-06-01", "--end", "2023-07-01")
    assert code == 1 and "no usage records in 2023-06-01T00:00:00Z" in err


def test_progress_goes_to_stderr_not_the_report(prometheus: RunningPrometheus,
                                                tmp_path: Path) -> None:
    out = tmp_path / "report.csv"
    code, stdout, err = run("--prometheus-url", prometheus.url, *JAN, "--format", "csv",
                            "--max-samples-per-query", "20000", "-o", str(out))
    assert code == 0 and stdout == ""
    assert "podtally_llm_tokens_total: query 2/" in err
    whole = csv_rows("--prometheus-url", prometheus.url, *JAN)
    assert list(csv.DictReader(io.StringIO(out.read_text()))) == whole
    code, _, err = run("--prometheus-url", prometheus.url, *JAN, "-q", "--format", "csv")
    assert code == 0 and "query" not in err


def test_an_empty_period_is_a_clear_error(prometheus: RunningPrometheus) -> None:
    code, out, err = run("--prometheus-url", prometheus.url, "--start", "2023-06-01",
                         "--end", "2023-07-01", "--format", "csv")
    assert code == 1 and out == ""
    assert "no samples of podtally_llm_* in 2023-06-01T00:00:00Z – 2023-07-01T00:00:00Z" in err


def test_an_invoice_without_metered_usage_is_a_clear_error(
        prometheus: RunningPrometheus) -> None:
    code, _, err = run("--prometheus-url", prometheus.url, *JAN,
                       "--invoice", "openai=100.00,deepseek=12.50")
    assert code == 2 and "no metered cost for deepseek" in err
    code, _, err = run("--prometheus-url", prometheus.url, *JAN, "--invoice", "openai=12.345")
    assert code == 2 and "in cents" in err


def test_one_source_only() -> None:
    code, _, err = run(*JAN)
    assert code == 2 and "--prometheus-url URL or --records PATH" in err


def test_focus_from_records_conforms(calls: list[month.Call], tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    records.write_text("\n".join(month.record_lines(calls)) + "\n")
    code, out, _ = run("--records", str(records), *JAN, "--format", "focus", "-q")
    assert code == 0
    header = next(csv.reader(io.StringIO(out)))
    rows = list(csv.DictReader(io.StringIO(out)))
    assert problems(header, rows) == []
    by_day = month.totals(calls, ("provider",), by_scrape=False)
    for (provider,), t in by_day.items():
        assert abs(sum(float(r["ListCost"]) for r in rows if r["ProviderName"] == provider)
                   - t.cost_usd) < 1e-6
        assert sum(int(r["ConsumedQuantity"]) for r in rows
                   if r["ProviderName"] == provider) == t.tokens_total
