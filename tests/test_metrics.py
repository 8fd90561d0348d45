"""Zero-first exposure: what Prometheus sees, scrape by scrape."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from support.sidecar import parse_metrics, total

from podtally.metrics import MAX_HELD_OBSERVATIONS, Meters
from podtally.usage import Tokens, UsageRecord


def record(model: str = "gpt-4o-mini-2024-07-18", ttft: float | None = 0.1) -> UsageRecord:
    tokens = Tokens(input=10, cache_read=2, output=5, reasoning=1)
    return UsageRecord(
        timestamp="2026-11-26T00:00:00+00:00", namespace="ns", pod="p", workload="w", team="t",
        app="a", service_account="sa", provider="openai", host="api.openai.com", operation="chat",
        model=model, request_model=None, streamed=ttft is not None, status="200",
        service_tier=None, tokens=tokens, tokens_total=tokens.total, tokens_estimated=False,
        cost_usd=0.5, priced=True, price_tier="standard", duration_seconds=1.0,
        time_to_first_token_seconds=ttft, request_id=None, response_id=None,
        usage_injected=False, error=None,
    )


def scrape(m: Meters) -> dict:
    return parse_metrics(m.scrape().decode())


def test_a_new_series_is_zero_first_then_counted() -> None:
    m = Meters(CollectorRegistry())
    m.observe(record())
    m.observe(record())
    assert not m.everything_scraped()
    first = scrape(m)
    assert total(first, "podtally_llm_requests_total") == 0
    assert total(first, "podtally_llm_tokens_total", token_type="input") == 0
    assert total(first, "podtally_llm_request_duration_seconds_count") == 0
    second = scrape(m)
    assert total(second, "podtally_llm_requests_total") == 2
    assert total(second, "podtally_llm_tokens_total", token_type="input") == 20
    assert total(second, "podtally_llm_cost_usd_total") == 1.0
    assert total(second, "podtally_llm_time_to_first_token_seconds_count") == 2
    assert m.everything_scraped()


def test_known_series_count_at_once() -> None:
    m = Meters(CollectorRegistry())
    m.observe(record())
    scrape(m)
    m.observe(record())
    assert total(scrape(m), "podtally_llm_requests_total") == 2
    assert m.pending == 0


def test_nothing_scraped_keeps_memory_bounded() -> None:
    m = Meters(CollectorRegistry())
    for _ in range(5 * MAX_HELD_OBSERVATIONS):
        m.observe(record())
    # counters hold one running sum per series; histograms at most the cap
    assert m.pending <= 20
    assert total(scrape(m), "podtally_llm_requests_total") == 0  # still zero first
    assert total(scrape(m), "podtally_llm_requests_total") == 5 * MAX_HELD_OBSERVATIONS


def test_zero_first_off() -> None:
    m = Meters(CollectorRegistry(), zero_first=False)
    m.observe(record(ttft=None))
    assert total(scrape(m), "podtally_llm_requests_total") == 1
