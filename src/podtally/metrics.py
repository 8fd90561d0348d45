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
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from podtally.usage import UsageRecord

ID_LABELS = ("namespace", "workload", "team", "app", "service_account")

# LLM calls last from ~100 ms (embeddings) to minutes (long reasoning streams).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3, 6, 12, 30, 60)

_Series = tuple[str, tuple[str, ...]]


class Meters:
    def __init__(self, registry: CollectorRegistry, *, zero_first: bool = True) -> None:
        self.registry = registry
        self.zero_first = zero_first
        self._lock = threading.Lock()
        self._created: set[_Series] = set()
        self._exposed: set[_Series] = set()
        self._staged: list[Callable[[], None]] = []
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

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._staged)

    def observe(self, rec: UsageRecord) -> None:
        updates = self._updates(rec)
        with self._lock:
            fresh = [s for s, _ in updates if s not in self._exposed]
            if self.zero_first and (fresh or self._staged):
                for series, _ in updates:
                    name, labels = series
                    self._metric(name).labels(*labels)  # expose the series at 0
                    self._created.add(series)
                self._staged.append(_apply_all(updates))
                return
            for _, apply in updates:
                apply()
            self._created.update(s for s, _ in updates)
            self._exposed.update(s for s, _ in updates)
            self.last_change = time.time()

    def scrape(self) -> bytes:
        """The exposition for /metrics; staged calls are applied once their zeros are out."""
        with self._lock:
            body = generate_latest(self.registry)
            self.last_scrape = time.time()
            self._exposed.update(self._created)
            if self._staged:
                for apply in self._staged:
                    apply()
                self._staged.clear()
                self.last_change = time.time()
            return body

    def everything_scraped(self) -> bool:
        """True when Prometheus has seen every call counted so far."""
        with self._lock:
            return not self._staged and self.last_scrape >= self.last_change

    def _metric(self, name: str) -> Counter | Histogram:
        metric: Counter | Histogram = getattr(self, name)
        return metric

    def _updates(self, rec: UsageRecord) -> list[tuple[_Series, Callable[[], None]]]:
        ident = (rec.namespace, rec.workload, rec.team, rec.app, rec.service_account)
        who = (*ident, rec.provider, rec.model)
        slim = (rec.namespace, rec.team, rec.provider, rec.model)
        out: list[tuple[_Series, Callable[[], None]]] = []

        def inc(name: str, labels: tuple[str, ...], amount: float = 1.0) -> None:
            metric = self._metric(name)
            out.append(((name, labels), lambda: metric.labels(*labels).inc(amount)))  # type: ignore[union-attr]

        def obs(name: str, labels: tuple[str, ...], value: float) -> None:
            metric = self._metric(name)
            out.append(((name, labels), lambda: metric.labels(*labels).observe(value)))  # type: ignore[union-attr]

        inc("requests", (*who, rec.operation, rec.status))
        if rec.tokens is not None:
            for token_type, n in rec.tokens.as_dict().items():
                inc("tokens", (*who, token_type), n)
            inc("cost", who, rec.cost_usd)
            if not rec.priced:
                inc("unpriced", who)
            if rec.tokens_estimated:
                inc("estimated", who)
        obs("duration", slim, rec.duration_seconds)
        if rec.time_to_first_token_seconds is not None:
            obs("ttft", slim, rec.time_to_first_token_seconds)
        return out


def _apply_all(updates: list[tuple[_Series, Callable[[], None]]]) -> Callable[[], None]:
    def apply() -> None:
        for _, update in updates:
            update()

    return apply
