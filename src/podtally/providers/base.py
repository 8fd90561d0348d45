"""What every provider parser shares: the wire framing, fed chunk by chunk.

A provider module supplies an `Accumulator` that understands the provider's JSON objects;
`ResponseParser` feeds it from whatever framing the response uses (one JSON body, or an
SSE stream). Pure: no I/O, no mitmproxy, no clock.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from podtally.providers.sse import SSEDecoder
from podtally.usage import CallUsage

# A JSON body larger than this is not parsed (its call is still counted, usage unknown):
# real non-streamed LLM responses are kilobytes; large embedding batches a few MiB.
MAX_JSON_BODY = 64 * 1024 * 1024


class Accumulator(Protocol):
    """Provider knowledge: fold one decoded JSON object (body or stream event) into state."""

    usage: CallUsage
    saw_output: bool

    def on_object(self, event: str, obj: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class ResponseParser:
    """Framing: turns response bytes into JSON objects for an accumulator, incrementally."""

    def __init__(self, acc: Accumulator, *, content_type: str) -> None:
        self.acc = acc
        ctype = content_type.split(";", 1)[0].strip().lower()
        self.streaming = ctype == "text/event-stream"
        self._sse = SSEDecoder() if self.streaming else None
        self._body: list[bytes] = []
        self._size = 0
        self._too_large = False
        self._bad_events = 0

    @property
    def saw_output(self) -> bool:
        return self.acc.saw_output

    def feed(self, chunk: bytes) -> None:
        if self._sse is not None:
            for ev in self._sse.feed(chunk):
                if ev.data == "[DONE]":
                    continue
                self._on_json(ev.event, ev.data)
            return
        if self._too_large:
            return
        self._size += len(chunk)
        if self._size > MAX_JSON_BODY:
            self._too_large = True
            self._body = []
            return
        self._body.append(chunk)

    def finish(self, *, complete: bool = True) -> CallUsage:
        """End of the response. `complete=False` when the stream was cut short."""
        usage = self.acc.usage
        if self._sse is None:
            if self._too_large:
                usage.parse_error = f"body larger than {MAX_JSON_BODY} bytes: not parsed"
            elif self._body:
                self._on_json("", b"".join(self._body).decode("utf-8", "replace"))
        self.acc.finish()
        if not complete and usage.parse_error is None:
            usage.parse_error = "response ended before it was complete"
        if self._bad_events and usage.parse_error is None:
            usage.parse_error = f"{self._bad_events} unparseable JSON object(s)"
        return usage

    def _on_json(self, event: str, text: str) -> None:
        try:
            obj = json.loads(text)
        except ValueError:
            self._bad_events += 1
            return
        if isinstance(obj, dict):
            self.acc.on_object(event, obj)


def as_int(value: object) -> int:
    """A token count from JSON: ints (and integral floats) only; anything else counts 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return 0


def as_dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
