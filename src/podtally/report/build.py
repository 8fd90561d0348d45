"""From raw counter samples to a report: each series' exact increase, then rows (pure).

The samples come from a `SampleSource` (the Prometheus client, or a list in tests).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from podtally.report.increase import CounterIncrease
from podtally.report.period import Period
from podtally.report.rows import DEFAULT_BY, METRICS, Labels, Row, aggregate, total_row

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


@dataclass(frozen=True)
class Report:
    period: Period
    by: tuple[str, ...]
    series: tuple[SeriesIncrease, ...]
    source: str = ""
    warnings: tuple[str, ...] = ()

    def rows(self, by: Sequence[str] | None = None) -> list[Row]:
        return aggregate(((s.metric, s.labels, s.value) for s in self.series),
                         self.by if by is None else by)

    def total(self, rows: Sequence[Row]) -> Row:
        return total_row(rows, len(self.by))


def series_increases(source: SampleSource, metric: str, period: Period, lookback_ms: int
                     ) -> list[SeriesIncrease]:
    start, end = period.start_ms, period.end_ms
    state: dict[tuple[tuple[str, str], ...], tuple[Mapping[str, str], CounterIncrease]] = {}
    for labels, samples in source.raw_samples(metric, start - lookback_ms, end):
        key = tuple(sorted(labels.items()))
        if key not in state:
            state[key] = (labels, CounterIncrease(start, end))
        state[key][1].feed_all(samples)
    return [SeriesIncrease(metric, labels, inc.value)
            for labels, inc in state.values()]


def build_report(source: SampleSource, period: Period, *, by: Sequence[str] = DEFAULT_BY,
                 lookback_ms: int = 3_600_000, source_name: str = "") -> Report:
    series = [s for metric in METRICS
              for s in series_increases(source, metric, period, lookback_ms)]
    return Report(period, tuple(by), tuple(series), source_name)
