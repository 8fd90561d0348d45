"""The report's period and the durations around it, in Prometheus' milliseconds (pure)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w)")


@dataclass(frozen=True)
class Period:
    """[start, end) in UTC; both midnight of the days given on the command line."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("period bounds must be timezone-aware")
        if self.end <= self.start:
            raise ValueError(f"the end ({self.end:%Y-%m-%d}) must be after the start "
                             f"({self.start:%Y-%m-%d})")

    @classmethod
    def from_days(cls, start: date, end: date) -> Period:
        return cls(datetime(start.year, start.month, start.day, tzinfo=UTC),
                   datetime(end.year, end.month, end.day, tzinfo=UTC))

    @property
    def start_ms(self) -> int:
        return to_ms(self.start)

    @property
    def end_ms(self) -> int:
        return to_ms(self.end)


def to_ms(t: datetime) -> int:
    return (t - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def iso(t: datetime) -> str:
    """ISO 8601 in UTC with a Z, to the second: `2024-01-02T00:00:00Z`."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_duration(text: str) -> int:
    """A Prometheus duration (`90s`, `5m`, `1h30m`, `2d`) in milliseconds; > 0."""
    s = text.strip()
    pos, total = 0, 0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _UNIT_MS[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ValueError(f"not a duration: {text!r} (e.g. 30m, 1h, 2d)")
    if total <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return total


def plan_chunks(start_ms: int, end_ms: int, samples: int, max_per_query: int
                ) -> list[tuple[int, int]]:
    """Split [start, end) into equal, contiguous [a, b) ranges of about `max_per_query` samples.

    `samples` is what the whole range holds (Prometheus' `count_over_time`); a query for raw
    samples must stay under Prometheus' `--query.max-samples` and a response must fit memory.
    """
    if end_ms <= start_ms:
        return []
    parts = max(1, math.ceil(samples / max(1, max_per_query)))
    parts = min(parts, end_ms - start_ms)  # never below one millisecond per range
    step = math.ceil((end_ms - start_ms) / parts)
    return [(a, min(a + step, end_ms)) for a in range(start_ms, end_ms, step)]
