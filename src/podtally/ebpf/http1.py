"""HTTP/1.1 seen from the side: both directions of one connection, reassembled.

The agent only reads: it needs each message's head and its body bytes as they arrive, in
order, with the framing RFC 9112 gives (Content-Length, chunked transfer coding, a body
until close; no body for HEAD, 1xx, 204, 304), keep-alive and pipelining. That is this
small state machine, one reader per direction (h11, which the sidecar's mitmproxy uses, is
a full peer: mirroring both sides through it cost ~4x the CPU per call).

Pure: bytes in (any split), events out. A connection that does not parse (joined mid-way,
HTTP/2, another protocol) is marked broken and picked up again at the next request line.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

MAX_HEAD = 64 * 1024  # request/response line plus headers
MAX_CHUNK_LINE = 1024
_REQUEST_LINE = re.compile(rb"^[A-Z]{3,10} \S+ HTTP/1\.[01]\r\n")
_METHOD = re.compile(rb"^[A-Z]{1,10}(?: |$)")  # how a request line starts
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n"


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Body:
    data: bytes
    from_client: bool


@dataclass(frozen=True, slots=True)
class End:
    from_client: bool


@dataclass(frozen=True, slots=True)
class Broken:
    """The stream stopped parsing; messages in flight will not complete."""

    reason: str


Event = RequestHead | ResponseHead | Body | End | Broken


class ParseError(Exception):
    pass


_WS = " \t\r\n\x0b\x0c"  # what bytes.strip() strips (str.strip() also strips \xa0, \x85)


def _parse_headers(lines: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name[0] in _WS or name[-1] in _WS:
            raise ParseError("malformed header line")
        key, val = name.lower(), value.strip(_WS)
        out[key] = f"{out[key]}, {val}" if key in out else val
    return out


# Reader states.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE = range(7)


class _Reader:
    """One direction's messages."""

    def __init__(self, from_client: bool, methods: deque[str]) -> None:
        self.from_client = from_client
        self.methods = methods  # requests' methods, in order, for framing responses
        self.buf = bytearray()
        self.state = _HEAD
        self.left = 0

    @property
    def idle(self) -> bool:
        return self.state == _HEAD and not self.buf

    def feed(self, data: bytes, out: list[Event]) -> None:
        self.buf += data
        while self._step(out):
            pass

    def close(self, out: list[Event]) -> None:
        if self.state == _UNTIL_CLOSE:
            if self.buf:
                out.append(Body(bytes(self.buf), self.from_client))
                self.buf.clear()
            out.append(End(self.from_client))
            self.state = _HEAD
        elif not self.idle:
            raise ParseError("connection closed inside a message")

    def _take_owed(self, out: list[Event]) -> bool:
        """Emit as much of the `left` body bytes (a Content-Length body or one chunk) as is
        buffered; False when nothing is."""
        buf = self.buf
        if not buf:
            return False
        take = min(self.left, len(buf))
        out.append(Body(bytes(buf[:take]), self.from_client))
        del buf[:take]
        self.left -= take
        return True

    def _step(self, out: list[Event]) -> bool:
        buf = self.buf
        if self.state == _HEAD:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise ParseError("head too large")
                return False
            head = bytes(buf[:end])
            del buf[:end + 4]
            self._head(head, out)
            return True
        if self.state == _LENGTH:
            if not self._take_owed(out):
                return False
            if self.left == 0:
                self._end(out)
            return True
        if self.state == _CHUNK_SIZE:
            nl = buf.find(b"\r\n")
            if nl < 0:
                if len(buf) > MAX_CHUNK_LINE:
                    raise ParseError("chunk size line too long")
                return False
            size_text = bytes(buf[:nl]).split(b";", 1)[0].strip()
            del buf[:nl + 2]
            try:
                self.left = int(size_text, 16)
            except ValueError:
                raise ParseError("bad chunk size") from None
            self.state = _CHUNK_DATA if self.left else _TRAILERS
            return True
        if self.state == _CHUNK_DATA:
            if not self._take_owed(out):
                return False
            if self.left == 0:
                self.state = _CHUNK_END
            return True
        if self.state == _CHUNK_END:
            if len(buf) < 2:
                return False
            if buf[:2] != b"\r\n":
                raise ParseError("chunk not followed by CRLF")
            del buf[:2]
            self.state = _CHUNK_SIZE
            return True
        if self.state == _TRAILERS:
            nl = buf.find(b"\r\n")
            if nl < 0:
                if len(buf) > MAX_HEAD:
                    raise ParseError("trailers too large")
                return False
            del buf[:nl + 2]
            if nl == 0:  # the empty line after the trailers
                self._end(out)
            return True
        # _UNTIL_CLOSE: everything is body.
        if buf:
            out.append(Body(bytes(buf), self.from_client))
            buf.clear()
        return False

    def _head(self, head: bytes, out: list[Event]) -> None:
        # Decoded once (latin-1 maps every byte): the lines are split and parsed as str.
        line, *rest = head.decode("latin-1").split("\r\n")
        headers = _parse_headers(rest)
        parts = line.split(" ", 2)
        if self.from_client:
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                raise ParseError("not an HTTP/1.1 request line")
            method = parts[0]
            out.append(RequestHead(method, parts[1], headers))
            self.methods.append(method)
            self._frame(headers, bodyless=False, out=out)
            return
        if (len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isascii()
                or not parts[1].isdigit()):
            raise ParseError("not an HTTP/1.1 status line")
        status = int(parts[1])
        if status < 200:
            return  # 100 Continue and friends: the real response follows
        method = self.methods.popleft() if self.methods else "POST"
        out.append(ResponseHead(status, headers))
        bodyless = method == "HEAD" or status in (204, 304)
        self._frame(headers, bodyless=bodyless, out=out, until_close=True)

    def _frame(self, headers: dict[str, str], *, bodyless: bool, out: list[Event],
               until_close: bool = False) -> None:
        if bodyless:
            self._end(out)
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self.state = _CHUNK_SIZE
        elif "content-length" in headers:
            try:
                self.left = int(headers["content-length"].split(",")[0])
            except ValueError:
                raise ParseError("bad Content-Length") from None
            if self.left < 0:
                raise ParseError("bad Content-Length")
            if self.left == 0:
                self._end(out)
            else:
                self.state = _LENGTH
        elif until_close:
            self.state = _UNTIL_CLOSE  # a response without framing ends with the connection
        else:
            self._end(out)  # a request without framing has no body

    def _end(self, out: list[Event]) -> None:
        out.append(End(self.from_client))
        self.state = _HEAD


class Http1Observer:
    def __init__(self) -> None:
        self.broken: str | None = None
        self.http2 = False
        self._reset()

    def _reset(self) -> None:
        self._head = b""
        methods: deque[str] = deque()
        self._client = _Reader(True, methods)
        self._server = _Reader(False, methods)

    def from_client(self, data: bytes) -> list[Event]:
        if self.broken is not None:
            if self.http2 or not _REQUEST_LINE.match(data):
                return []
            self.broken = None  # a new request starts here: pick the stream up again
            self._reset()
        elif self._client.idle:
            # A message's first bytes: HTTP/2's preface, or an HTTP/1.1 request line.
            data, self._head = self._head + data, b""
            if HTTP2_PREFACE.startswith(data):
                self._head = data  # too short to tell yet
                return []
            if data.startswith(HTTP2_PREFACE):
                self.http2 = True
                return self._break("HTTP/2 is not parsed")
            if not _METHOD.match(data):
                return self._break("not HTTP/1.1")  # nothing is held for other protocols
        return self._feed(self._client, data)

    def from_server(self, data: bytes) -> list[Event]:
        if self.broken is not None:
            return []
        return self._feed(self._server, data)

    def close(self) -> list[Event]:
        """The connection ended: a close-delimited body ends here; anything else is cut."""
        if self.broken is not None:
            return []
        out: list[Event] = []
        try:
            self._server.close(out)
            self._client.close(out)
        except ParseError as exc:
            out += self._break(str(exc))
        return out

    def _feed(self, reader: _Reader, data: bytes) -> list[Event]:
        out: list[Event] = []
        try:
            reader.feed(data, out)
        except ParseError as exc:
            out += self._break(str(exc))
        return out

    def _break(self, reason: str) -> list[Event]:
        self.broken = reason
        return [Broken(reason)]
