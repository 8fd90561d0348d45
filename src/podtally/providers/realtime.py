"""OpenAI Realtime (WebSocket): one metered call per `response.done` server event.

Audio deltas are large base64 frames; only events whose type is worth reading are decoded
(a cheap look at the start of the frame decides), so the meter stays off the hot path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from podtally.providers.base import as_dict, as_int, text, uncached
from podtally.usage import CallUsage, Tokens

_INTERESTING = re.compile(
    rb'"type"\s*:\s*"(response\.done|response\.created|session\.(created|updated))"'
)
_HEAD = 256  # "type" comes first in every server event OpenAI sends


@dataclass
class RealtimeResponse:
    usage: CallUsage
    status: str  # completed, cancelled, incomplete, failed
    started_at: float | None


def tokens_from_realtime(usage: dict[str, Any]) -> Tokens:
    cached = as_int(as_dict(usage.get("input_token_details")).get("cached_tokens"))
    return Tokens(
        input=uncached(as_int(usage.get("input_tokens")), cached),
        cache_read=cached,
        output=as_int(usage.get("output_tokens")),
    )


class RealtimeSession:
    def __init__(self, model: str | None) -> None:
        self.model = model
        self._started: dict[str, float] = {}

    def on_server_message(self, content: bytes | str, now: float) -> RealtimeResponse | None:
        raw = content.encode() if isinstance(content, str) else content
        m = _INTERESTING.search(raw[:_HEAD])
        if m is None:
            return None
        try:
            obj = json.loads(raw)
        except ValueError:
            return None
        # The head only pre-filters: the match may be a nested "type", so the event's own decides.
        if not isinstance(obj, dict) or obj.get("type") != m.group(1).decode():
            return None
        kind = m.group(1).decode()
        if kind.startswith("session."):
            self.model = text(as_dict(obj.get("session")).get("model")) or self.model
            return None
        resp = as_dict(obj.get("response"))
        rid = text(resp.get("id"))
        if kind == "response.created":
            if rid:
                self._started[rid] = now
            return None
        usage = resp.get("usage")
        out = CallUsage(
            model=self.model,
            tokens=tokens_from_realtime(usage) if isinstance(usage, dict) else None,
            response_id=rid,
        )
        status = text(resp.get("status")) or "completed"
        return RealtimeResponse(out, status, self._started.pop(rid, None) if rid else None)
