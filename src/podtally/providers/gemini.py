"""Gemini API and Vertex AI Gemini: generateContent and streamGenerateContent (SSE or a
streamed JSON array). `usageMetadata` is cumulative in streams: the last one wins."""

from __future__ import annotations

from typing import Any

from podtally.providers.base import BaseAccumulator, as_dict, as_int, text, uncached
from podtally.usage import Tokens


def tokens_from_metadata(meta: dict[str, Any]) -> Tokens:
    cached = as_int(meta.get("cachedContentTokenCount"))
    return Tokens(
        input=uncached(as_int(meta.get("promptTokenCount")), cached)
        + as_int(meta.get("toolUsePromptTokenCount")),
        cache_read=cached,
        output=as_int(meta.get("candidatesTokenCount")),
        reasoning=as_int(meta.get("thoughtsTokenCount")),
    )


class GeminiAccumulator(BaseAccumulator):
    def on_object(self, event: str, obj: dict[str, Any]) -> None:
        model = text(obj.get("modelVersion"))
        if model:
            self.usage.model = model
        rid = text(obj.get("responseId"))
        if rid:
            self.usage.response_id = rid
        meta = obj.get("usageMetadata")
        if isinstance(meta, dict):
            self.usage.tokens = tokens_from_metadata(meta)
            tier = text(meta.get("serviceTier")) or text(obj.get("serviceTier"))
            if tier:
                self.usage.service_tier = tier.lower()
            elif meta.get("trafficType") == "PROVISIONED_THROUGHPUT":
                # Vertex: served from pre-bought capacity, not billed per token.
                self.usage.service_tier = "provisioned"
        candidates = obj.get("candidates")
        if not self.saw_output and isinstance(candidates, list):
            for cand in candidates:
                if as_dict(as_dict(cand).get("content")).get("parts"):
                    self.saw_output = True
                    break
        err = as_dict(obj.get("error"))
        if err:
            self.usage.parse_error = f"provider error: {err.get('status', 'unknown')}"


class GeminiEmbeddingAccumulator(BaseAccumulator):
    """embedContent / batchEmbedContents report no usage on the Gemini API; Vertex's
    predict-style responses carry `statistics.token_count` per embedding."""

    def on_object(self, event: str, obj: dict[str, Any]) -> None:
        meta = obj.get("usageMetadata")
        if isinstance(meta, dict):
            self.usage.tokens = Tokens(input=as_int(meta.get("promptTokenCount")))
