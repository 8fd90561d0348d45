"""Monthly budgets per team: actual against budget, and the month-end projection (pure).

The budgets file is YAML:

    currency: USD        # optional; the report is in USD
    teams:
      payments: 1500
      research: 800

A budget compares one calendar month: the period must start on the 1st and end no later
than the 1st of the next month. The projection is the run rate so far, carried to the end
of the month: actual × month length / time covered, where time covered ends at the
period's end or at `as_of` (now), whichever is earlier — a month-to-date report
(`--end` = the 1st of next month) projects from today.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

import yaml

from podtally.report.period import Period


@dataclass(frozen=True)
class Budgets:
    monthly_usd: Mapping[str, Decimal]


def parse_budgets(text: str, source: str = "budgets") -> Budgets:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: not valid YAML: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("teams"), dict):
        raise ValueError(f"{source}: expected a mapping with `teams: {{team: monthly USD}}`")
    unknown = sorted(set(doc) - {"teams", "currency"})
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(map(str, unknown))}")
    currency = str(doc.get("currency", "USD"))
    if currency != "USD":
        raise ValueError(f"{source}: currency {currency!r}: the report is in USD")
    out: dict[str, Decimal] = {}
    for team, amount in doc["teams"].items():
        if isinstance(amount, bool) or not isinstance(amount, int | float | str):
            raise ValueError(f"{source}: team {team!r}: not an amount: {amount!r}")
        try:
            value = Decimal(str(amount))
        except InvalidOperation as err:
            raise ValueError(f"{source}: team {team!r}: not an amount: {amount!r}") from err
        if not value.is_finite() or value < 0:
            raise ValueError(f"{source}: team {team!r}: a budget is a non-negative amount")
        out[str(team)] = value
    return Budgets(out)


def month_bounds(period: Period) -> tuple[datetime, datetime]:
    """The calendar month the period lies in; ValueError if it is not one month's part."""
    start = period.start
    month_end = datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)
    if start.day != 1 or period.end > month_end:
        raise ValueError(f"budgets are monthly: the period must start on the 1st and end by "
                         f"the 1st of the next month (e.g. --start {start:%Y-%m}-01 --end "
                         f"{month_end:%Y-%m-%d})")
    return start, month_end


@dataclass(frozen=True)
class BudgetLine:
    team: str
    actual_usd: Decimal
    budget_usd: Decimal | None
    projected_usd: Decimal

    @property
    def used(self) -> float | None:
        return None if not self.budget_usd else float(self.actual_usd / self.budget_usd)

    @property
    def projected_share(self) -> float | None:
        return None if not self.budget_usd else float(self.projected_usd / self.budget_usd)

    @property
    def status(self) -> str:
        if self.budget_usd is None:
            return "no budget"
        if self.actual_usd > self.budget_usd:
            return "over"
        if self.projected_usd > self.budget_usd:
            return "projected over"
        return "ok"


def covered(period: Period, as_of: datetime) -> tuple[Decimal, Decimal]:
    """(seconds of the month the data covers, seconds in the month)."""
    start, month_end = month_bounds(period)
    covered_to = min(period.end, max(as_of, start))
    return (Decimal((covered_to - start).total_seconds()),
            Decimal((month_end - start).total_seconds()))


def budget_lines(actual: Mapping[str, Decimal], budgets: Budgets, period: Period,
                 as_of: datetime) -> list[BudgetLine]:
    """One line per team with a budget or a cost, most expensive first."""
    seen, month = covered(period, as_of)
    if seen <= 0:
        raise ValueError(f"the period starts {period.start:%Y-%m-%d}, after now: nothing to "
                         "project")
    teams = set(actual) | set(budgets.monthly_usd)
    factor = month / seen
    lines = [BudgetLine(t, actual.get(t, Decimal(0)), budgets.monthly_usd.get(t),
                        (actual.get(t, Decimal(0)) * factor).quantize(Decimal("0.01")))
             for t in teams]
    return sorted(lines, key=lambda b: (-b.actual_usd, b.team))
