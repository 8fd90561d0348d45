"""Amazon Bedrock: Converse / ConverseStream and InvokeModel / InvokeModelWithResponseStream.

Converse reports usage in its own shape (body `usage`, the stream's `metadata` event).
InvokeModel returns the model vendor's native body, so it is read by that vendor's
accumulator (Anthropic's for `anthropic.*`), and Bedrock adds its own counts for every
model: `x-amzn-bedrock-*-token-count` headers on InvokeModel, and
`amazon-bedrock-invocationMetrics` in the last chunk of a stream. Bedrock's own counts are
what it bills, so they win where present.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from podtally.providers.anthropic import AnthropicAccumulator
from podtally.providers.base import Accumulator, BaseAccumulator, as_dict, as_int
from podtally.usage import Tokens

_HEADER_FIELDS = {
    "x-amzn-bedrock-input-token-count": "input",
    "x-amzn-bedrock-output-token-count": "output",
    "x-amzn-bedrock-cache-read-input-token-count": "cache_read",
    "x-amzn-bedrock-cache-write-input-token-count": "cache_write",
}
_METRIC_FIELDS = {
    "inputTokenCount": "input",
    "outputTokenCount": "output",
    "cacheReadInputTokenCount": "cache_read",
    "cacheWriteInputTokenCount": "cache_write",
}


class ConverseAccumulator(BaseAccumulator):
    def on_object(self, event: str, obj: dict[str, Any]) -> None:
        if event == "contentBlockDelta":
            self.saw_output = True
        elif event == "metadata":
            self.ended = True
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage.tokens = Tokens(
                input=as_int(usage.get("inputTokens")),
                cache_read=as_int(usage.get("cacheReadInputTokens")),
                cache_write=as_int(usage.get("cacheWriteInputTokens")),
                output=as_int(usage.get("outputTokens")),
            )
        tier = as_dict(obj.get("serviceTier")).get("type")
        if isinstance(tier, str) and tier:
            self.usage.service_tier = tier


class InvokeAccumulator(BaseAccumulator):
    def __init__(self, model_id: str) -> None:
        super().__init__()
        self.inner: Accumulator | None = (
            AnthropicAccumulator() if _vendor(model_id) == "anthropic" else None
        )
        self._bedrock: dict[str, int] = {}

    def on_headers(self, headers: Mapping[str, str]) -> None:
        for name, bucket in _HEADER_FIELDS.items():
            value = headers.get(name)
            if value is not None and value.strip().isdigit():
                self._bedrock[bucket] = int(value)

    def on_object(self, event: str, obj: dict[str, Any]) -> None:
        if self.inner is not None:
            self.inner.on_object(event, obj)
            self.saw_output = self.saw_output or self.inner.saw_output
            self.ended = self.inner.ended
        elif _has_text(obj):
            self.saw_output = True
        metrics = obj.get("amazon-bedrock-invocationMetrics")
        if isinstance(metrics, dict):
            for name, bucket in _METRIC_FIELDS.items():
                if name in metrics:
                    self._bedrock[bucket] = as_int(metrics[name])

    def finish(self) -> None:
        if self.inner is not None:
            self.inner.finish()
            inner = self.inner.usage
            self.usage.response_id = inner.response_id
            self.usage.service_tier = inner.service_tier
            self.usage.tokens = inner.tokens
            self.usage.parse_error = inner.parse_error
            # The model stays the path's Bedrock model id: that is what Bedrock bills.
        if self._bedrock:
            self.usage.tokens = Tokens(**self._bedrock)


def _vendor(model_id: str) -> str:
    """`anthropic` from `anthropic.claude-…`, `us.anthropic.claude-…` or an ARN ending so."""
    name = model_id.rsplit("/", 1)[-1]
    parts = name.split(".")
    if len(parts) > 2 and parts[0] in ("us", "eu", "apac", "global", "us-gov", "jp", "au", "ca"):
        parts = parts[1:]
    return parts[0]


def _has_text(obj: dict[str, Any]) -> bool:
    for key in ("outputText", "generation", "completion", "text"):
        if obj.get(key):
            return True
    items = obj.get("outputs") or obj.get("results")
    for item in items if isinstance(items, list) else ():
        if as_dict(item).get("text") or as_dict(item).get("outputText"):
            return True
    delta = as_dict(as_dict(obj.get("contentBlockDelta")).get("delta"))
    return bool(delta.get("text"))
