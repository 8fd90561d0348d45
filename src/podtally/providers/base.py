"""What every provider parser shares: a framing (framing.py) feeding an accumulator.

A provider module supplies an `Accumulator` that understands the provider's JSON objects;
`ResponseParser` feeds it from whatever framing the response uses. Pure: no I/O, no
mitmproxy, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from podtally.providers.framing import framer_for
from podtally.usage import CallUsage


class Accumulator(Protocol):
    """Provider knowledge: fold one decoded JSON object (body or stream event) into state."""

    usage: CallUsage
    saw_output: bool
    ended: bool

    def on_headers(self, headers: Mapping[str, str]) -> None: ...

    def on_object(self, event: str, obj: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class BaseAccumulator:
    """Defaults for the hooks most providers do not need."""

    def __init__(self) -> None:
        self.usage = CallUsage()
        self.saw_output = False
        # The provider's own end-of-response marker was seen (message_stop, [DONE], …):
        # a client that hangs up after it has had the whole response.
        self.ended = False

    def on_headers(self, headers: Mapping[str, str]) -> None:
        pass

    def finish(self) -> None:
        pass


class ResponseParser:
    """Turns response bytes into JSON objects for an accumulator, incrementally."""

    def __init__(
        self, acc: Accumulator, *, content_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        self.acc = acc
        self.framer, self.streaming = framer_for(content_type)
        if headers is not None:
            acc.on_headers(headers)

    @property
    def saw_output(self) -> bool:
        return self.acc.saw_output

    @property
    def ended(self) -> bool:
        return self.acc.ended or bool(getattr(self.framer, "done", False))

    def feed(self, chunk: bytes) -> None:
        for event, obj in self.framer.feed(chunk):
            self.acc.on_object(event, obj)

    def finish(self, *, complete: bool = True) -> CallUsage:
        """End of the response. `complete=False` when the stream was cut short."""
        for event, obj in self.framer.close():
            self.acc.on_object(event, obj)
        self.acc.finish()
        usage = self.acc.usage
        if usage.parse_error is None:
            if self.framer.error is not None:
                usage.parse_error = self.framer.error
            elif not complete:
                usage.parse_error = "response ended before it was complete"
            elif self.framer.bad:
                usage.parse_error = f"{self.framer.bad} unparseable JSON object(s)"
        return usage


def as_int(value: object) -> int:
    """A token count from JSON: non-negative ints (and integral floats) only; anything else
    counts 0. The buckets feed Prometheus counters, which cannot go down."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and value.is_integer():
        return max(int(value), 0)
    return 0


def uncached(prompt: int, cached: int) -> int:
    """The prompt tokens not read from the cache. A cached count above the prompt count can
    only mean the prompt count leaves the cached part out (the Anthropic way)."""
    return prompt - cached if cached <= prompt else prompt


def as_dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
