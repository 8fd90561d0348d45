"""Incremental Server-Sent Events parser (WHATWG HTML "event stream interpretation").

Fed raw bytes as they arrive off the wire, in arbitrary splits; yields complete events.
Only the fields the meters need are kept (`event`, `data`); `id` and `retry` are parsed
and dropped. The buffer only ever holds the current unfinished line.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Event:
    event: str
    data: str


class SSEDecoder:
    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._event = ""
        self._first = True
        self._pending_cr = False

    def feed(self, chunk: bytes) -> Iterator[Event]:
        if self._first:
            # A leading BOM is ignored once; wait until three bytes show whether it is one.
            chunk = self._buf + chunk
            self._buf = b""
            if len(chunk) < 3 and _BOM.startswith(chunk):
                self._buf = chunk
                return
            self._first = False
            chunk = chunk.removeprefix(_BOM)
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF half of a CRLF split across chunks
        self._pending_cr = False
        buf = self._buf + chunk
        start = 0
        n = len(buf)
        while start < n:
            cr = buf.find(b"\r", start)
            lf = buf.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr == -1 or (lf != -1 and lf < cr):
                end, nxt = lf, lf + 1
            elif cr + 1 < n:
                end, nxt = cr, cr + (2 if buf[cr + 1 : cr + 2] == b"\n" else 1)
            else:  # CR at the end: the line ends, but a LF may follow in the next chunk
                end, nxt = cr, cr + 1
                self._pending_cr = True
            event = self._line(buf[start:end].decode("utf-8", "replace"))
            if event is not None:
                yield event
            start = nxt
        self._buf = buf[start:]

    def close(self) -> Iterator[Event]:
        """End of stream. Per the spec an unterminated final event is discarded."""
        self._buf = b""
        self._data = []
        self._event = ""
        return iter(())

    def _line(self, line: str) -> Event | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            event = Event(self._event or "message", "\n".join(self._data))
            self._data = []
            self._event = ""
            return event
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None
