"""The one shape every data plane produces: what a metered LLM call cost, in disjoint buckets.

Parsers fill a `CallUsage`; the data plane (mitmproxy addon, eBPF agent) adds identity,
status and timing to make a `UsageRecord`, which becomes metrics and one JSON line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict

TokenType = Literal["input", "cache_read", "cache_write", "output", "reasoning"]
TOKEN_TYPES: tuple[TokenType, ...] = ("input", "cache_read", "cache_write", "output", "reasoning")


class Tokens(BaseModel):
    """Disjoint token buckets: their sum is what the provider bills for the call."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: int = 0
    cache_read: int = 0
    cache_write: int = 0
    output: int = 0
    reasoning: int = 0

    @property
    def total(self) -> int:
        return self.input + self.cache_read + self.cache_write + self.output + self.reasoning

    def as_dict(self) -> dict[str, int]:
        return {t: getattr(self, t) for t in TOKEN_TYPES}


@dataclass
class CallUsage:
    """What a provider parser learned from one response. Every field may stay unknown."""

    model: str | None = None
    tokens: Tokens | None = None
    service_tier: str | None = None
    response_id: str | None = None
    # Set when the counts come from an estimate (a tokenizer), not from the provider.
    estimated: bool = False
    # Why parsing stopped short (malformed body, truncated stream); None when clean.
    parse_error: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


class Identity(BaseModel):
    """Who made the call: taken from the pod (env, downward API), never from the request."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: str = "unknown"
    pod: str = "unknown"
    workload: str = "unknown"
    team: str = "unattributed"
    app: str = "unknown"
    service_account: str = "unknown"


class UsageRecord(BaseModel):
    """One JSON line per metered call. Never carries prompt, response content or secrets."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["podtally.llm_call"] = "podtally.llm_call"
    timestamp: str
    namespace: str
    pod: str
    workload: str
    team: str
    app: str
    service_account: str
    provider: str
    host: str
    operation: str
    model: str
    request_model: str | None
    streamed: bool
    status: str
    service_tier: str | None
    tokens: Tokens | None
    tokens_total: int
    tokens_estimated: bool
    cost_usd: float
    priced: bool
    price_tier: str | None
    duration_seconds: float
    time_to_first_token_seconds: float | None
    request_id: str | None
    response_id: str | None
    usage_injected: bool
    error: str | None
