"""The exact increase of one counter series over [start, end), from its raw samples (pure).

An increment belongs to the scrape that first shows it: for each sample s_i at a time in
[start, end), add s_i − s_(i−1), where s_(i−1) is the series' previous sample (it may lie
before `start`: the baseline), or s_i itself when s_i < s_(i−1) (a counter reset: the
process restarted and counted from 0, as Prometheus assumes).

A series with no sample before its first one in the window is counted from that first
sample: its own value is not usage of this period. podtally's sidecar exposes every new
series at 0 before counting into it, and again after a restart, so that first sample is 0
and nothing is lost. Nothing is interpolated or extrapolated (unlike `increase()`), so
integer counters give integers and consecutive periods add up exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

DAY_MS = 86_400_000


@dataclass
class CounterIncrease:
    """Fed one series' samples in time order (in as many batches as needed)."""

    start_ms: int
    end_ms: int
    value: float = 0.0
    resets: int = 0
    in_window: int = 0  # samples seen in [start, end)
    first_ms: int | None = None  # the series' first sample fed (a baseline, or in the window)
    # What was counted in each day of the window ([start + i days, start + i + 1 days)),
    # by the same rule: the days add up to `value` exactly.
    daily: dict[int, float] = field(default_factory=dict)
    _prev: float | None = None
    _last_ts: int | None = None

    def feed(self, ts_ms: int, v: float) -> None:
        if ts_ms >= self.end_ms or not math.isfinite(v):
            return
        if self._last_ts is not None and ts_ms <= self._last_ts:
            return  # already seen (overlapping query ranges)
        self._last_ts = ts_ms
        if self.first_ms is None:
            self.first_ms = ts_ms
        prev, self._prev = self._prev, v
        if ts_ms < self.start_ms:
            return  # a baseline
        self.in_window += 1
        if prev is None:
            return  # the series' first sample
        if v >= prev:
            gained = v - prev
        else:
            self.resets += 1
            gained = v
        if gained:
            self.value += gained
            day = (ts_ms - self.start_ms) // DAY_MS
            self.daily[day] = self.daily.get(day, 0.0) + gained

    @property
    def last_ms(self) -> int | None:
        """The series' last sample fed before `end`."""
        return self._last_ts

    def feed_all(self, samples: Iterable[tuple[int, float]]) -> CounterIncrease:
        for ts, v in samples:
            self.feed(ts, v)
        return self


def exact_increase(samples: Iterable[tuple[int, float]], start_ms: int, end_ms: int) -> float:
    """What a counter counted in [start, end), given its samples from before `start` on."""
    return CounterIncrease(start_ms, end_ms).feed_all(samples).value
