"""The report from the sidecars' JSON usage records (`--records`), for reconciliation (pure).

One JSON object per line, as `podtally sidecar` prints on stdout (`podtally.records`). Each
record is one call, counted on the day of its `timestamp` (when the call started) if that
lies in [start, end): the exact numbers the sidecars saw, nothing interpolated. Prometheus
counts a call at the first scrape after it, so a call seconds before midnight can land on
the other side of a period's edge there; over a month the two agree to those few calls.

What is not a record — a log line, a line cut short when a pod was killed, another JSON
object — is skipped and counted, with its line numbers, in the report's warnings (and on
standard error). A line that says it is a record (`"kind": "podtally.llm_call"`) but lacks
a field the report needs is an error: dropping it would silently lose cost.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from podtally.report.build import Report, SeriesIncrease
from podtally.report.period import Period
from podtally.report.rows import COST, ID_LABELS, REQUESTS, TOKENS
from podtally.usage import TOKEN_TYPES

KIND = "podtally.llm_call"
_LABELS = (*ID_LABELS, "provider", "model")
_SHOWN = 10  # line numbers listed in a warning


class RecordError(ValueError):
    """A line that claims to be a usage record but cannot be read as one."""


@dataclass
class RecordStats:
    lines: int = 0
    records: int = 0  # usage records read, in the period or not
    in_period: int = 0
    skipped: list[int] = field(default_factory=list)  # line numbers of non-record lines

    def warnings(self, source: str) -> list[str]:
        if not self.skipped:
            return []
        shown = ", ".join(map(str, self.skipped[:_SHOWN]))
        more = f" and {len(self.skipped) - _SHOWN} more" if len(self.skipped) > _SHOWN else ""
        return [f"{source}: skipped {len(self.skipped)} of {self.lines} lines that are not "
                f"usage records (line {shown}{more})"]


def _text(rec: dict[str, Any], key: str, where: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str):
        raise RecordError(f"{where}: field {key!r} must be a string, not {value!r}")
    return value


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise RecordError(f"{where}: {what} must be a non-negative number, not {value!r}")
    return float(value)


def _timestamp(rec: dict[str, Any], where: str) -> datetime:
    text = _text(rec, "timestamp", where)
    try:
        ts = datetime.fromisoformat(text)
    except ValueError as err:
        raise RecordError(f"{where}: timestamp {text!r} is not ISO 8601") from err
    if ts.tzinfo is None:
        raise RecordError(f"{where}: timestamp {text!r} has no time zone")
    return ts


def read_records(lines: Iterable[str], period: Period, *, by: tuple[str, ...],
                 source: str) -> tuple[Report, RecordStats]:
    stats = RecordStats()
    # (metric, sorted labels) → [value, {day: value}]
    acc: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[list[float], dict[int, float]]] = {}

    def add(metric: str, labels: dict[str, str], value: float, day: int) -> None:
        if not value:
            return
        total, daily = acc.setdefault((metric, tuple(sorted(labels.items()))), ([0.0], {}))
        total[0] += value
        daily[day] = daily.get(day, 0.0) + value

    for lineno, line in enumerate(lines, 1):
        stats.lines = lineno
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or rec.get("kind") != KIND:
            stats.skipped.append(lineno)
            continue
        where = f"{source}:{lineno}"
        stats.records += 1
        ts = _timestamp(rec, where)
        labels = {k: _text(rec, k, where) for k in _LABELS}
        tokens = rec.get("tokens")
        if tokens is not None and not isinstance(tokens, dict):
            raise RecordError(f"{where}: tokens must be an object or null, not {tokens!r}")
        counts = {t: _number((tokens or {}).get(t, 0), f"tokens.{t}", where)
                  for t in TOKEN_TYPES}
        cost = _number(rec.get("cost_usd"), "cost_usd", where)
        status = rec.get("status")
        operation = rec.get("operation")
        if not (period.start <= ts < period.end):
            continue
        stats.in_period += 1
        day = (ts - period.start) // timedelta(days=1)
        for t, n in counts.items():
            add(TOKENS, {**labels, "token_type": t}, n, day)
        add(COST, labels, cost, day)
        add(REQUESTS, {**labels, "operation": str(operation), "code": str(status)}, 1.0, day)

    series = tuple(SeriesIncrease(metric, dict(labels), total[0], daily)
                   for (metric, labels), (total, daily) in acc.items())
    report = Report(period, by, series, source, warnings=tuple(stats.warnings(source)),
                    samples=stats.in_period)
    return report, stats
