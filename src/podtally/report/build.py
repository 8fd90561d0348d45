"""From raw counter samples to a report: each series' exact increase, then rows (pure).

The samples come from a `SampleSource` (the Prometheus client, or a list in tests).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Protocol

from podtally.report.budgets import Budgets
from podtally.report.egress import EGRESS_METRICS
from podtally.report.increase import DAY_MS, CounterIncrease
from podtally.report.period import Period
from podtally.report.rows import (
    COST,
    DEFAULT_BY,
    METRICS,
    Labels,
    Row,
    aggregate,
    own_labels,
    total_row,
)

# One series' samples within one fetched range, oldest first: ((ms, value), ...).
SeriesSamples = tuple[Mapping[str, str], Sequence[tuple[int, float]]]


class SampleSource(Protocol):
    def raw_samples(self, metric: str, start_ms: int, end_ms: int) -> Iterable[SeriesSamples]:
        """Every sample of `metric` in [start, end), in ranges that come in time order; a
        series may appear in several ranges."""
        ...


@dataclass(frozen=True)
class SeriesIncrease:
    metric: str
    labels: Labels
    value: float
    # What the series counted on each day of the period: day index (0 = the start's day) →
    # increase; the days add up to `value`.
    daily: Mapping[int, float] = field(default_factory=dict)
    first_ms: int | None = None  # the series' first sample read (a baseline, or in the period)
    last_ms: int | None = None  # and its last before the period's end


@dataclass(frozen=True)
class Report:
    period: Period
    by: tuple[str, ...]
    series: tuple[SeriesIncrease, ...]
    source: str = ""
    warnings: tuple[str, ...] = ()
    samples: int = 0  # samples (or records) read in the period: 0 means no data at all
    # Chargeback: each provider's invoice in USD (`--invoice`); empty for showback.
    invoices: Mapping[str, Decimal] = field(default_factory=dict)
    budgets: Budgets | None = None  # `--budgets`
    as_of: datetime | None = None  # "now", for the budgets' month-end projection
    # Samples of the eBPF agent's connection counters in the period (`egress`); None: the
    # source cannot hold them (usage records are calls, not connections).
    egress_samples: int | None = None

    def rows(self, by: Sequence[str] | None = None) -> list[Row]:
        return aggregate(((s.metric, s.labels, s.value) for s in self.series),
                         self.by if by is None else by)

    def rows_on_day(self, day: int, by: Sequence[str]) -> list[Row]:
        """The rows of one day of the period (0 = the start's day)."""
        return aggregate(((s.metric, s.labels, s.daily.get(day, 0.0)) for s in self.series), by)

    def total(self, rows: Sequence[Row]) -> Row:
        return total_row(rows, len(self.by))

    @property
    def days(self) -> int:
        return -(-(self.period.end_ms - self.period.start_ms) // DAY_MS)

    def daily_cost(self, label: str) -> dict[str, list[float]]:
        """USD per value of `label` on each day of the period (the metric's own labels)."""
        out: dict[str, list[float]] = {}
        for s in self.series:
            if s.metric != COST:
                continue
            key = own_labels(s.labels).get(label, "")
            days = out.setdefault(key, [0.0] * self.days)
            for day, value in s.daily.items():
                days[day] += value
        return out


def series_increases(source: SampleSource, metric: str, period: Period, lookback_ms: int
                     ) -> tuple[list[SeriesIncrease], int]:
    """Each series' increase over the period, and how many samples lay in the period."""
    start, end = period.start_ms, period.end_ms
    state: dict[tuple[tuple[str, str], ...], tuple[Mapping[str, str], CounterIncrease]] = {}
    for labels, samples in source.raw_samples(metric, start - lookback_ms, end):
        key = tuple(sorted(labels.items()))
        if key not in state:
            state[key] = (labels, CounterIncrease(start, end))
        state[key][1].feed_all(samples)
    series = [SeriesIncrease(metric, labels, inc.value, dict(inc.daily), inc.first_ms,
                             inc.last_ms) for labels, inc in state.values()]
    return series, sum(inc.in_window for _, inc in state.values())


def build_report(source: SampleSource, period: Period, *, by: Sequence[str] = DEFAULT_BY,
                 lookback_ms: int = 3_600_000, source_name: str = "") -> Report:
    series: list[SeriesIncrease] = []
    samples = 0
    for metric in METRICS:
        found, seen = series_increases(source, metric, period, lookback_ms)
        series += found
        samples += seen
    egress_samples = 0
    for metric in EGRESS_METRICS:  # the eBPF agent's, when it runs: metered vs unmetered
        found, seen = series_increases(source, metric, period, lookback_ms)
        series += found
        egress_samples += seen
    return Report(period, tuple(by), tuple(series), source_name, samples=samples,
                  egress_samples=egress_samples)
