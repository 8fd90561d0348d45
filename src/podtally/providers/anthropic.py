"""Anthropic Messages, non-streamed and streamed, with cache reads/writes and iterations."""

from __future__ import annotations

from typing import Any

from podtally.providers.base import BaseAccumulator, as_dict, as_int
from podtally.usage import Tokens

_FIELDS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
           "output_tokens")


def tokens_from_fields(fields: dict[str, int]) -> Tokens:
    return Tokens(
        input=fields.get("input_tokens", 0),
        cache_read=fields.get("cache_read_input_tokens", 0),
        cache_write=fields.get("cache_creation_input_tokens", 0),
        output=fields.get("output_tokens", 0),
    )


class AnthropicAccumulator(BaseAccumulator):
    """Per field, the last reported value wins (message_delta over message_start); where
    `usage.iterations[]` is present (server-side compaction, tool loops) the iterations
    are what is billed, so their sum replaces the top-level counts."""

    def __init__(self) -> None:
        super().__init__()
        self._fields: dict[str, int] = {}
        self._iterations: Tokens | None = None

    def on_object(self, event: str, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if kind == "message_start":
            self._take_message(as_dict(obj.get("message")))
        elif kind == "message_delta":
            self._take_usage(obj.get("usage"))
        elif kind == "content_block_delta":
            self.saw_output = True
        elif kind == "message_stop":
            self.ended = True
        elif kind == "message":  # a non-streamed response
            self._take_message(obj)
        elif kind == "error":
            err = as_dict(obj.get("error"))
            self.usage.parse_error = f"provider error event: {err.get('type', 'unknown')}"

    def _take_message(self, msg: dict[str, Any]) -> None:
        model = msg.get("model")
        if isinstance(model, str) and model:
            self.usage.model = model
        mid = msg.get("id")
        if isinstance(mid, str) and mid:
            self.usage.response_id = mid
        self._take_usage(msg.get("usage"))

    def _take_usage(self, raw: object) -> None:
        if not isinstance(raw, dict):
            return
        for name in _FIELDS:
            value = raw.get(name)
            if value is not None:
                self._fields[name] = as_int(value)
        tier = raw.get("service_tier")
        if isinstance(tier, str) and tier:
            self.usage.service_tier = tier
        iterations = raw.get("iterations")
        if isinstance(iterations, list) and iterations:
            sums = dict.fromkeys(_FIELDS, 0)
            for item in iterations:
                item = as_dict(item)
                for name in _FIELDS:
                    sums[name] += as_int(item.get(name))
            self._iterations = tokens_from_fields(sums)
        self.usage.tokens = self._iterations or tokens_from_fields(self._fields)
