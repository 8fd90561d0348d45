"""The contract's Prometheus metrics, on an explicit registry (tests build their own).

Zero first: Prometheus' `increase()` cannot see the first value of a series that appears
already non-zero, so a Job pod that makes one call and exits would be lost to every
`increase()` query. A call whose series have never been scraped is therefore staged: its
series are exposed at 0, and the call is added right after the next scrape has seen
those zeros. Series that already exist are updated at once.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from podtally.usage import Identity, UsageRecord

ID_LABELS = ("namespace", "workload", "team", "app", "service_account")

# LLM calls last from ~100 ms (embeddings) to minutes (long reasoning streams).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3, 6, 12, 30, 60)

_Series = tuple[str, tuple[str, ...]]
_HISTOGRAMS = frozenset({"duration", "ttft"})
# A series nobody scrapes stops holding observations after this many (bounded memory).
MAX_HELD_OBSERVATIONS = 1000


class Meters:
    """The contract's metrics. `connections=True` (the eBPF agent) adds the coverage
    counters: LLM connections by how they are metered, and the unmetered ones."""

    def __init__(self, registry: CollectorRegistry, *, zero_first: bool = True,
                 connections: bool = False) -> None:
        self.registry = registry
        self.zero_first = zero_first
        self._lock = threading.Lock()
        self._created: set[_Series] = set()
        self._exposed: set[_Series] = set()
        # Per new series: what waits for its zero to be scraped (a counter's running sum,
        # a histogram's observations).
        self._pending: dict[_Series, list[float]] = {}
        self._children: dict[_Series, Any] = {}
        self.last_change = 0.0  # when a call last changed the exposed values
        self.last_scrape = 0.0
        self.requests = Counter(
            "podtally_llm_requests", "LLM calls metered, by outcome.",
            (*ID_LABELS, "provider", "model", "operation", "code"), registry=registry,
        )
        self.tokens = Counter(
            "podtally_llm_tokens", "Tokens billed, in disjoint buckets (token_type).",
            (*ID_LABELS, "provider", "model", "token_type"), registry=registry,
        )
        self.cost = Counter(
            "podtally_llm_cost_usd", "Cost in USD from the price table (0 when unpriced).",
            (*ID_LABELS, "provider", "model"), registry=registry,
        )
        self.duration = Histogram(
            "podtally_llm_request_duration_seconds",
            "From the request leaving the app to the last response byte.",
            ("namespace", "team", "provider", "model"), buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "podtally_llm_time_to_first_token_seconds",
            "Streams only: from the request to the first chunk carrying output.",
            ("namespace", "team", "provider", "model"), buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.unpriced = Counter(
            "podtally_llm_unpriced_requests",
            "Calls whose model has no known price (counted at cost 0).",
            (*ID_LABELS, "provider", "model"), registry=registry,
        )
        self.estimated = Counter(
            "podtally_llm_estimated_requests",
            "Calls whose token counts were estimated, not reported by the provider.",
            (*ID_LABELS, "provider", "model"), registry=registry,
        )
        self.faults = Counter(
            "podtally_metering_faults",
            "Metering faults (traffic was passed through unaltered), by stage.",
            ("stage",), registry=registry,
        )
        if connections:
            self.unmetered = Counter(
                "podtally_llm_unmetered_connections",
                "TCP connections to LLM endpoints that no podtally sidecar meters.",
                (*ID_LABELS, "provider"), registry=registry,
            )
            self.connections = Counter(
                "podtally_llm_connections",
                "TCP connections to LLM endpoints, by how they are metered (via: sidecar = "
                "redirected to the pod's sidecar, proxy = the sidecar's own upstream leg, "
                "direct = unmetered).",
                (*ID_LABELS, "provider", "via"), registry=registry,
            )

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def observe(self, rec: UsageRecord) -> None:
        with self._lock:
            self._stage(self._updates(rec))

    def _stage(self, updates: list[tuple[_Series, float]]) -> None:
        """Apply updates, or hold them until their zeros are scraped (lock held)."""
        for series, amount in updates:
            if not self.zero_first or series in self._exposed:
                self._apply(series, amount)
                self.last_change = time.time()
                continue
            name, labels = series
            if series not in self._created:
                self._metric(name).labels(*labels)  # exposed at 0 until the next scrape
                self._created.add(series)
            held = self._pending.setdefault(series, [])
            if name in _HISTOGRAMS:
                held.append(amount)
                if len(held) > MAX_HELD_OBSERVATIONS:  # nobody scrapes: stop holding
                    self._release(series)
            else:
                held[:] = [sum(held) + amount]  # counters: one running amount

    def count_connection(self, who: Identity, provider: str, via: str) -> None:
        """One connection to an LLM endpoint (zero first, like calls)."""
        ident = (who.namespace, who.workload, who.team, who.app, who.service_account)
        updates: list[tuple[_Series, float]] = [(("connections", (*ident, provider, via)), 1.0)]
        if via == "direct":
            updates.append((("unmetered", (*ident, provider)), 1.0))
        with self._lock:
            self._stage(updates)

    def scrape(self) -> bytes:
        """The exposition for /metrics; held calls are added once their zeros are out."""
        with self._lock:
            body = generate_latest(self.registry)
            self.last_scrape = time.time()
            self._exposed.update(self._created)
            for series in list(self._pending):
                self._release(series)
            return body

    def everything_scraped(self) -> bool:
        """True when Prometheus has seen every call counted so far."""
        with self._lock:
            return not self._pending and self.last_scrape >= self.last_change

    def _release(self, series: _Series) -> None:
        for amount in self._pending.pop(series, ()):
            self._apply(series, amount)
        self._exposed.add(series)
        self.last_change = time.time()

    def _apply(self, series: _Series, amount: float) -> None:
        name, labels = series
        # labels() validates and locks on every call; the children live as long as the
        # registry, so they are looked up once per series.
        child = self._children.get(series)
        if child is None:
            child = self._children[series] = self._metric(name).labels(*labels)
        if name in _HISTOGRAMS:
            child.observe(amount)  # type: ignore[union-attr]
        else:
            child.inc(amount)  # type: ignore[union-attr]

    def _metric(self, name: str) -> Counter | Histogram:
        metric: Counter | Histogram = getattr(self, name)
        return metric

    @staticmethod
    def _updates(rec: UsageRecord) -> list[tuple[_Series, float]]:
        ident = (rec.namespace, rec.workload, rec.team, rec.app, rec.service_account)
        who = (*ident, rec.provider, rec.model)
        slim = (rec.namespace, rec.team, rec.provider, rec.model)
        out: list[tuple[_Series, float]] = [(("requests", (*who, rec.operation, rec.status)), 1.0)]
        if rec.tokens is not None:
            out += [(("tokens", (*who, t)), float(n)) for t, n in rec.tokens.as_dict().items()]
            out.append((("cost", who), rec.cost_usd))
            if not rec.priced:
                out.append((("unpriced", who), 1.0))
            if rec.tokens_estimated:
                out.append((("estimated", who), 1.0))
        out.append((("duration", slim), rec.duration_seconds))
        if rec.time_to_first_token_seconds is not None:
            out.append((("ttft", slim), rec.time_to_first_token_seconds))
        return out


