"""Egress coverage: LLM connections metered by a sidecar against unmetered ones (pure).

Not to be confused with the attribution coverage (`chargeback`: the share of *cost* whose
team is known). This one answers "how much LLM traffic escapes metering at all", from the
eBPF agent's `podtally_llm_connections_total{ID, provider, via}` over the period (exact
increases, resets handled, as for cost):

- metered: `via="sidecar"`, connections a pod's capture rules send through its sidecar;
- unmetered: `via="direct"`, a pod without a sidecar, a destination its rules do not
  capture (a bypass), or a node process. The contract's
  `podtally_llm_unmetered_connections_total` counts exactly these (the agent increments both
  at once); it is read too, and a difference is reported as a warning, never averaged away;
- `via="proxy"` is the sidecar's own upstream leg of a metered call: neither, or it would
  count those calls twice. Kept in the JSON as a check (it should be close to metered).

Egress coverage = metered / (metered + unmetered), the Grafana dashboard's "Metering
coverage". It counts connections, not calls or dollars; an unmetered connection's calls may
still be in the cost (the agent meters OpenSSL HTTP/1.1 itself), or not (Go, BoringSSL,
HTTP/2). Groups follow --by where the label exists on connections (not `model`); with
none left, namespace and workload, which is where a missing sidecar is fixed.

No agent samples in the period is "no eBPF agent data", never 100% or 0%; usage records
(`--records`) hold calls, not connections: "not in usage records".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from podtally.report.period import iso, to_ms
from podtally.report.rows import ID_LABELS, own_labels

if TYPE_CHECKING:
    from podtally.report.build import Report

CONNECTIONS = "podtally_llm_connections_total"
UNMETERED = "podtally_llm_unmetered_connections_total"
EGRESS_METRICS = (CONNECTIONS, UNMETERED)
EGRESS_LABELS = (*ID_LABELS, "provider")
FALLBACK_BY = ("namespace", "workload")

# Agent counters whose last sample is older than this before the period's end (or before
# now, for a period not over) mean the agent stopped or stopped being scraped.
STALE_MS = 3_600_000

OK = "ok"
NO_AGENT_DATA = "no eBPF agent data"
NOT_IN_RECORDS = "not in usage records"


def share_text(part: float, whole: float) -> str:
    """A share as `12.3%`, never rounded onto an edge it is not on: `>99.9%`, `<0.1%`, so
    one unmetered connection in a million never reads as 100%. `—` when `whole` is 0."""
    if not whole:
        return "—"
    x = part / whole
    if 0.999 < x < 1:
        return ">99.9%"
    if 0 < x < 0.001:
        return "<0.1%"
    return f"{x * 100:.1f}%"


@dataclass
class EgressRow:
    group: tuple[str, ...]
    metered: float = 0.0  # via sidecar
    unmetered: float = 0.0  # via direct
    proxy: float = 0.0  # the sidecars' upstream legs (not in coverage)

    @property
    def connections(self) -> float:
        """Connections by the workloads themselves: metered + unmetered."""
        return self.metered + self.unmetered

    @property
    def unmetered_share(self) -> float | None:
        return self.unmetered / self.connections if self.connections else None

    @property
    def coverage(self) -> float | None:
        return self.metered / self.connections if self.connections else None


@dataclass(frozen=True)
class Egress:
    status: str  # OK, NO_AGENT_DATA or NOT_IN_RECORDS
    by: tuple[str, ...]
    rows: list[EgressRow] = field(default_factory=list)
    total: EgressRow = field(default_factory=lambda: EgressRow(()))
    warnings: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()  # --by labels that connections do not carry (`model`)

    @property
    def grouping(self) -> str:
        """How the groups were chosen, when not simply --by."""
        if not self.dropped:
            return ""
        return (f"grouped by {', '.join(self.by)}: connections carry no "
                f"{', '.join(self.dropped)}")

    @property
    def available(self) -> bool:
        return self.status == OK

    @property
    def coverage(self) -> float | None:
        """Metered share of the workloads' LLM connections; None without data."""
        return self.total.coverage if self.available else None

    def headline(self) -> str:
        """`Egress coverage: …`, the sentence the table, the page and the CLI show."""
        if self.status == NO_AGENT_DATA:
            return ("Egress coverage: no eBPF agent data in the period (no "
                    f"{CONNECTIONS} samples): unmetered LLM traffic is unknown")
        if self.status == NOT_IN_RECORDS:
            return ("Egress coverage: not in usage records (they hold metered calls, not "
                    "connections): use --prometheus-url with the eBPF agent")
        t = self.total
        if not t.connections:
            return "Egress coverage: the eBPF agent saw no connections to LLM endpoints"
        return (f"Egress coverage: {share_text(t.metered, t.connections)} of "
                f"{t.connections:,.0f} connections to LLM endpoints went through a podtally "
                f"sidecar; {t.unmetered:,.0f} unmetered ({share_text(t.unmetered, t.connections)})")


def egress_by(by: Sequence[str]) -> tuple[str, ...]:
    """The --by labels that connections carry, else namespace and workload."""
    return tuple(b for b in by if b in EGRESS_LABELS) or FALLBACK_BY


def egress(report: Report) -> Egress:
    by = egress_by(report.by)
    dropped = tuple(b for b in report.by if b not in EGRESS_LABELS)
    if report.egress_samples is None:
        return Egress(NOT_IN_RECORDS, by, dropped=dropped)
    if not report.egress_samples:
        return Egress(NO_AGENT_DATA, by, dropped=dropped)
    rows: dict[tuple[str, ...], EgressRow] = {}
    checked: dict[tuple[str, ...], list[float]] = {}  # group → [direct, contract metric]
    first: int | None = None
    last: int | None = None
    for s in report.series:
        if s.metric not in EGRESS_METRICS:
            continue
        if s.first_ms is not None:
            first = s.first_ms if first is None else min(first, s.first_ms)
        if s.last_ms is not None:
            last = s.last_ms if last is None else max(last, s.last_ms)
        labels = own_labels(s.labels)
        key = tuple(labels.get(b, "") for b in by)
        if s.metric == UNMETERED:
            checked.setdefault(key, [0.0, 0.0])[1] += s.value
            continue
        row = rows.setdefault(key, EgressRow(key))
        via = labels.get("via", "")
        if via == "sidecar":
            row.metered += s.value
        elif via == "direct":
            row.unmetered += s.value
            checked.setdefault(key, [0.0, 0.0])[0] += s.value
        elif via == "proxy":
            row.proxy += s.value
    if not rows:  # the contract's counter alone: unmetered known, metered not
        unmetered = sum(u for _, u in checked.values())
        return Egress(NO_AGENT_DATA, by, dropped=dropped, warnings=(
            f"{UNMETERED} counts {unmetered:,.0f} unmetered connections, but without "
            f"{CONNECTIONS} the metered ones are unknown: no coverage to show",))
    kept = sorted((r for r in rows.values() if r.connections or r.proxy),
                  key=lambda r: (-r.unmetered, -r.metered, r.group))
    total = EgressRow(("TOTAL",) * len(by))
    for r in kept:
        total.metered += r.metered
        total.unmetered += r.unmetered
        total.proxy += r.proxy
    return Egress(OK, by, kept, total, _warnings(report, checked, first, last), dropped)


def _iso_ms(ms: int) -> str:
    return iso(datetime.fromtimestamp(ms / 1000, UTC))


def _warnings(report: Report, checked: dict[tuple[str, ...], list[float]],
              first: int | None, last: int | None) -> tuple[str, ...]:
    out = []
    if first is not None and first > report.period.start_ms:
        # No agent sample before the period (within --lookback): the agent began later,
        # was not scraped, or saw no LLM connection until then.
        out.append(f"the eBPF agent's counters begin at {_iso_ms(first)}, after the "
                   "period's start: connections before it, if the agent was not running, are "
                   "not counted")
    until = report.period.end_ms
    if report.as_of is not None:
        until = min(until, to_ms(report.as_of))
    if last is not None and until - last > STALE_MS:
        out.append(f"the eBPF agent's counters end at {_iso_ms(last)}, over an hour before "
                   f"{_iso_ms(until)}: connections after it are not counted (was the agent "
                   "stopped, or no longer scraped?)")
    # Where the contract metric was scraped, it must agree with via="direct".
    off = [(k, d, u) for k, (d, u) in sorted(checked.items()) if u and d != u]
    if off:
        k, d, u = off[0]
        out.append(f"{UNMETERED} and {CONNECTIONS}{{via=\"direct\"}} differ in {len(off)} "
                   f"group(s), e.g. {'/'.join(k)}: {u:,.0f} against {d:,.0f}; the table shows "
                   "the latter")
    return tuple(out)

