"""HTTP/1.1 seen from the side: both directions of one connection, reassembled by h11.

h11 parses one side of a conversation. An observer holds two: a server-role connection
reading what the client sent (requests) and a client-role connection reading what the
server sent (responses). Each is told, in a small mirrored message, what the other side
did, so both walk HTTP/1.1's state machine: keep-alive, pipelining, HEAD, Content-Length,
chunked transfer encoding and close-delimited bodies are h11's, not ours.

Pure: bytes in (any split), events out. A connection that does not parse (joined mid-way,
HTTP/2, garbage) is marked broken and picked up again at the next request line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import h11

MAX_HEAD = 64 * 1024  # request/response line plus headers
_REQUEST_LINE = re.compile(rb"^[A-Z]{3,10} \S+ HTTP/1\.[01]\r\n")
_METHOD = re.compile(rb"^[A-Z]{1,10}(?: |$)")  # how a request line starts
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n"
_MAX_ROUNDS = 10_000


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


def _headers(items: list[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in items:
        key, val = name.decode("latin-1").lower(), value.decode("latin-1")
        out[key] = f"{out[key]}, {val}" if key in out else val
    return out


class Http1Observer:
    def __init__(self) -> None:
        self.broken: str | None = None
        self.http2 = False
        self._reset()

    def _reset(self) -> None:
        self._head = b""
        self._client = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._server = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)

    def from_client(self, data: bytes) -> list[Event]:
        if self.broken is not None:
            if self.http2 or not _REQUEST_LINE.match(data):
                return []
            self.broken = None  # a new request starts here: pick the stream up again
            self._reset()
        elif self._fresh():
            # A new connection's first bytes: HTTP/2's preface, or HTTP/1.1.
            data, self._head = self._head + data, b""
            if HTTP2_PREFACE.startswith(data):
                self._head = data  # too short to tell yet
                return []
            if data.startswith(HTTP2_PREFACE):
                self.http2 = True
                return self._break("HTTP/2 is not parsed")
            if not _METHOD.match(data):
                return self._break("not HTTP/1.1")  # nothing is held for other protocols
        try:
            self._client.receive_data(data)
        except h11.RemoteProtocolError as exc:
            return self._break(str(exc))
        return self._drain()

    def from_server(self, data: bytes) -> list[Event]:
        if self.broken is not None:
            return []
        try:
            self._server.receive_data(data)
        except h11.RemoteProtocolError as exc:
            return self._break(str(exc))
        return self._drain()

    def close(self) -> list[Event]:
        """The connection ended: a close-delimited body ends here; anything else is cut."""
        if self.broken is not None:
            return []
        try:
            self._server.receive_data(b"")
            self._client.receive_data(b"")
        except h11.RemoteProtocolError as exc:
            return self._break(str(exc))
        return self._drain()

    def _fresh(self) -> bool:
        return (self._client.their_state is h11.IDLE
                and self._client.trailing_data == (b"", False))

    def _break(self, reason: str) -> list[Event]:
        self.broken = reason
        return [Broken(reason)]

    def _drain(self) -> list[Event]:
        out: list[Event] = []
        try:
            # Each round consumes input or ends a cycle; the bound is a safety net only.
            for _ in range(_MAX_ROUNDS):
                progress = self._step(self._client, out) | self._step(self._server, out)
                if self._cycle_done():
                    self._client.start_next_cycle()
                    self._server.start_next_cycle()
                    progress = True
                if not progress:
                    break
            else:
                out += self._break("no progress")
        except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
            out += self._break(str(exc))
        return out

    def _cycle_done(self) -> bool:
        return all(c.our_state is h11.DONE and c.their_state is h11.DONE
                   for c in (self._client, self._server))

    def _step(self, conn: h11.Connection, out: list[Event]) -> bool:
        """Every event `conn` has ready; True if there was one."""
        from_client = conn is self._client
        seen = False
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                return seen
            seen = True
            if isinstance(ev, h11.Request):
                headers = _headers(list(ev.headers))
                out.append(RequestHead(ev.method.decode("latin-1"),
                                       ev.target.decode("latin-1"), headers))
                # The response side learns the method (HEAD) and the framing of a
                # request with no body; the body itself is not copied.
                mirror = [("host", headers.get("host", "-")), ("content-length", "0")]
                if "close" in headers.get("connection", "").lower():
                    mirror.append(("connection", "close"))
                self._server.send(h11.Request(method=ev.method, target=ev.target,
                                              headers=mirror))
                self._server.send(h11.EndOfMessage())
            elif isinstance(ev, h11.Response):
                headers = _headers(list(ev.headers))
                out.append(ResponseHead(ev.status_code, headers))
                mirror = [("content-length", "0")]
                if "close" in headers.get("connection", "").lower():
                    mirror.append(("connection", "close"))
                self._client.send(h11.Response(status_code=200, headers=mirror))
                self._client.send(h11.EndOfMessage())
            elif isinstance(ev, h11.Data):
                out.append(Body(bytes(ev.data), from_client))
            elif isinstance(ev, h11.EndOfMessage):
                out.append(End(from_client))
            # InformationalResponse (100 Continue): nothing to meter.
