"""From what a data plane saw of one call to the UsageRecord: model choice, pricing, identity.

Pure and shared: the sidecar addon and the eBPF agent both describe a call as `CallFacts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from podtally.pricing import PriceBook
from podtally.usage import CallUsage, Identity, UsageRecord


@dataclass(frozen=True)
class CallFacts:
    provider: str
    host: str
    operation: str
    request_model: str | None
    streamed: bool
    status: str  # HTTP status, or "error" when no response came
    usage: CallUsage | None
    started: float  # epoch seconds
    ended: float
    first_token_at: float | None = None
    request_id: str | None = None
    usage_injected: bool = False
    error: str | None = None


def build_record(identity: Identity, prices: PriceBook, facts: CallFacts) -> UsageRecord:
    usage = facts.usage
    tokens = usage.tokens if usage else None
    # The model the response reports (the exact snapshot), else the request's.
    model = (usage.model if usage else None) or facts.request_model or "unknown"
    tier = usage.service_tier if usage else None
    started = datetime.fromtimestamp(facts.started, UTC)
    price = (
        prices.price(facts.provider, model, tokens.as_dict(), tier, started)
        if tokens is not None else None
    )
    error = facts.error or (usage.parse_error if usage else None)
    ttft = None
    if facts.streamed and facts.first_token_at is not None:
        ttft = max(0.0, facts.first_token_at - facts.started)
    return UsageRecord(
        timestamp=started.isoformat(),
        namespace=identity.namespace,
        pod=identity.pod,
        workload=identity.workload,
        team=identity.team,
        app=identity.app,
        service_account=identity.service_account,
        provider=facts.provider,
        host=facts.host,
        operation=facts.operation,
        model=model,
        request_model=facts.request_model,
        streamed=facts.streamed,
        status=facts.status,
        service_tier=tier,
        tokens=tokens,
        tokens_total=tokens.total if tokens else 0,
        tokens_estimated=bool(usage and usage.estimated),
        cost_usd=price.cost_usd if price else 0.0,
        priced=bool(price and price.priced),
        price_tier=price.applied_tier if price else None,
        duration_seconds=max(0.0, facts.ended - facts.started),
        time_to_first_token_seconds=ttft,
        request_id=facts.request_id,
        response_id=usage.response_id if usage else None,
        usage_injected=facts.usage_injected,
        error=error,
    )
