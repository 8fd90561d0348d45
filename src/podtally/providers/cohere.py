"""Cohere v2 (and v1) chat: billed units, in the body or the stream's `message-end`."""

from __future__ import annotations

from typing import Any

from podtally.providers.base import BaseAccumulator, as_dict, as_int, text
from podtally.usage import Tokens


def tokens_from_billed(billed: dict[str, Any]) -> Tokens:
    return Tokens(input=as_int(billed.get("input_tokens")),
                  output=as_int(billed.get("output_tokens")))


class CohereAccumulator(BaseAccumulator):
    def on_object(self, event: str, obj: dict[str, Any]) -> None:
        kind = obj.get("type") or obj.get("event_type")
        rid = text(obj.get("id")) or text(obj.get("generation_id"))
        if rid:
            self.usage.response_id = rid
        if kind in ("content-delta", "text-generation", "tool-call-delta"):
            self.saw_output = True
        elif kind in ("message-end", "stream-end"):
            self.ended = True
        # v2: usage.billed_units (body; message-end's delta.usage); v1: meta.billed_units
        # (body; stream-end's response.meta).
        for holder in (obj, as_dict(obj.get("delta")), as_dict(obj.get("response"))):
            billed = as_dict(as_dict(holder.get("usage")).get("billed_units")) or as_dict(
                as_dict(holder.get("meta")).get("billed_units")
            )
            if billed:
                self.usage.tokens = tokens_from_billed(billed)
