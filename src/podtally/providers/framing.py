"""Wire framings, incremental: bytes in (any split), decoded JSON objects out.

Each framer yields `(event, object)` pairs: `event` is the SSE event name or the AWS
event-stream `:event-type` ("" where the framing has none). Undecodable pieces are counted
in `bad`, never raised: a meter must survive what the wire brings.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any, Protocol

from botocore.eventstream import EventStreamBuffer

from podtally.providers.jsonscan import top_level_members
from podtally.providers.sse import SSEDecoder

Item = tuple[str, dict[str, Any]]

# A JSON body larger than this is not parsed (its call is still counted, usage unknown):
# real non-streamed LLM responses are kilobytes; large embedding batches a few MiB.
MAX_JSON_BODY = 64 * 1024 * 1024
# JSON bodies above this are scanned for their small top-level members instead of parsed.
LARGE_JSON_BODY = 4 * 1024 * 1024
# One line / element / event larger than this is skipped (no real event comes close).
MAX_ITEM = 16 * 1024 * 1024


class Framer(Protocol):
    bad: int
    error: str | None

    def feed(self, chunk: bytes) -> Iterator[Item]: ...

    def close(self) -> Iterator[Item]: ...


def _loads(text: str | bytes) -> dict[str, Any] | list[Any] | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict | list) else None


class SSEFramer:
    def __init__(self) -> None:
        self._sse = SSEDecoder()
        self.bad = 0
        self.error: str | None = None
        self.done = False  # saw the OpenAI-style end marker

    def feed(self, chunk: bytes) -> Iterator[Item]:
        for ev in self._sse.feed(chunk):
            if ev.data == "[DONE]":
                self.done = True
                continue
            obj = _loads(ev.data)
            if isinstance(obj, dict):
                yield ev.event, obj
            else:
                self.bad += 1

    def close(self) -> Iterator[Item]:
        return iter(())


class NDJSONFramer:
    """Newline-delimited JSON (Ollama's native streams)."""

    def __init__(self) -> None:
        self._buf = b""
        self.bad = 0
        self.error: str | None = None

    def feed(self, chunk: bytes) -> Iterator[Item]:
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        if len(self._buf) > MAX_ITEM:
            self._buf, self.bad = b"", self.bad + 1
        for line in lines:
            yield from self._line(line)

    def close(self) -> Iterator[Item]:
        rest, self._buf = self._buf, b""
        yield from self._line(rest)

    def _line(self, line: bytes) -> Iterator[Item]:
        if not line.strip():
            return
        obj = _loads(line)
        if isinstance(obj, dict):
            yield "", obj
        else:
            self.bad += 1


class JSONFramer:
    """One JSON document: an object, or a top-level array of objects streamed element by
    element (Gemini's streamGenerateContent without alt=sse). Elements are cut out of the
    byte stream by a small scanner (strings and nesting), so each is seen as it arrives and
    only the current element is held."""

    def __init__(self) -> None:
        self.bad = 0
        self.error: str | None = None
        self._mode: str | None = None  # "array" or "object", decided by the first byte
        self._body = bytearray()
        self._elem = bytearray()
        self._depth = 0
        self._in_str = False
        self._esc = False

    def feed(self, chunk: bytes) -> Iterator[Item]:
        if self._mode is None:
            stripped = chunk.lstrip()
            if not stripped:
                return
            self._mode = "array" if stripped[:1] == b"[" else "object"
            chunk = stripped[1:] if self._mode == "array" else chunk
        if self._mode == "object":
            if self.error is None:
                self._body += chunk
                if len(self._body) > MAX_JSON_BODY:
                    self.error = f"body larger than {MAX_JSON_BODY} bytes: not parsed"
                    self._body = bytearray()
            return
        yield from self._scan(chunk)

    def close(self) -> Iterator[Item]:
        if self._mode == "object" and self.error is None and self._body:
            body, self._body = self._body, bytearray()
            # Small bodies are parsed; large ones (embedding batches) only for their small
            # top-level members: usage, model, ids. Parsing would cost ~4x the size.
            obj = _loads(bytes(body)) if len(body) <= LARGE_JSON_BODY else (
                top_level_members(body) or None)
            if isinstance(obj, dict):
                yield "", obj
            elif isinstance(obj, list):
                yield from (("", o) for o in obj if isinstance(o, dict))
            else:
                items = _mislabelled_stream(bytes(body))
                if items:
                    yield from items
                else:
                    self.bad += 1

    def _scan(self, chunk: bytes) -> Iterator[Item]:
        if self.error is not None:
            return
        elem = self._elem
        for byte in chunk:
            if self._depth == 0 and byte != 0x7B:  # outside elements: commas, spaces, ']'
                continue
            elem.append(byte)
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif byte == 0x5C:
                    self._esc = True
                elif byte == 0x22:
                    self._in_str = False
            elif byte == 0x22:
                self._in_str = True
            elif byte in (0x7B, 0x5B):
                self._depth += 1
            elif byte in (0x7D, 0x5D):
                self._depth -= 1
                if self._depth == 0:
                    obj = _loads(bytes(elem))
                    elem.clear()
                    if isinstance(obj, dict):
                        yield "", obj
                    else:
                        self.bad += 1
            if len(elem) > MAX_ITEM:
                elem.clear()
                self.error = f"array element larger than {MAX_ITEM} bytes: not parsed"
                return


def _mislabelled_stream(body: bytes) -> list[Item]:
    """A stream served under a JSON (or no) Content-Type, as some gateways and servers do:
    SSE (`data:` lines) or newline-delimited JSON. Only tried when the body is no JSON
    document; small bodies only, since the whole body is held here anyway."""
    if len(body) > LARGE_JSON_BODY:
        return []
    head = body.lstrip()[:6]
    if head.startswith((b"data:", b"event:", b"id:", b":")):
        framer: SSEFramer | NDJSONFramer = SSEFramer()
    elif b"\n" in body.strip():
        framer = NDJSONFramer()
    else:
        return []
    items = [*framer.feed(body), *framer.close()]
    return items if items and not framer.bad else []


class EventStreamFramer:
    """AWS event-stream (Bedrock's *-stream APIs), decoded by botocore's own parser.

    InvokeModelWithResponseStream wraps each model-native JSON chunk base64-encoded in a
    `chunk` event's `bytes`; that inner object is what is yielded, as event "chunk".
    """

    def __init__(self) -> None:
        self._buf = EventStreamBuffer()
        self.bad = 0
        self.error: str | None = None

    def feed(self, chunk: bytes) -> Iterator[Item]:
        if self.error is not None:
            return
        self._buf.add_data(chunk)
        try:
            for message in self._buf:
                yield from self._message(message.headers, message.payload)
        except Exception as exc:  # noqa: BLE001 - botocore raises several parser errors
            self.error = f"invalid AWS event-stream: {type(exc).__name__}"

    def close(self) -> Iterator[Item]:
        return iter(())

    def _message(self, headers: dict[str, Any], payload: bytes) -> Iterator[Item]:
        kind = str(headers.get(":event-type") or headers.get(":exception-type") or "")
        if headers.get(":message-type") in ("exception", "error"):
            self.error = f"provider stream error: {kind or 'unknown'}"
            return
        obj = _loads(payload)
        if not isinstance(obj, dict):
            self.bad += 1
            return
        inner = obj.get("bytes")
        if kind == "chunk" and isinstance(inner, str):
            try:
                obj = json.loads(base64.b64decode(inner))
            except ValueError:
                self.bad += 1
                return
            if not isinstance(obj, dict):
                self.bad += 1
                return
        yield kind, obj


def framer_for(content_type: str) -> tuple[Framer, bool]:
    """The framer for a response's Content-Type, and whether it is a stream."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype == "text/event-stream":
        return SSEFramer(), True
    if ctype in ("application/x-ndjson", "application/ndjson", "application/jsonl",
                 "application/json-seq", "application/stream+json"):
        return NDJSONFramer(), True
    if ctype == "application/vnd.amazon.eventstream":
        return EventStreamFramer(), True
    return JSONFramer(), False
