"""TLS connections seen through SSL_write/SSL_read, turned into metered calls.

Per (pid, SSL*) connection: the plaintext goes through an HTTP/1.1 observer, each request
to an LLM host that `detect` recognises becomes a `MeteredCall` (podtally.calls, the same
glue the sidecar uses), and each finished call becomes `CallFacts` handed to `sink` with
the task that made it. Pure: no clock but the events' own timestamps, no I/O.

Bounded: at most `max_connections` connections are tracked (the least recently active is
dropped first), only the bodies of metered requests are held, up to `max_request_body`
bytes (only the few members detection reads matter), a connection that does not start
like HTTP/1.1 holds nothing, and connections idle longer than `idle_seconds` are let go.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from podtally.calls import MeteredCall, host_of, provider_of, request_id
from podtally.ebpf import http1
from podtally.ebpf.events import CLOSE, READ, TRUNC, WRITE, DataEvent, Task
from podtally.providers.registry import HostTable, operation_for
from podtally.records import CallFacts

Sink = Callable[[Task, CallFacts], None]
Fault = Callable[[str], None]
Ignore = Callable[[int, int], None]  # (pid, SSL*): this connection carries no LLM calls

MAX_CONNECTIONS = 4096
# Detection reads a few top-level members; bodies above 1 MiB are scanned, not parsed.
MAX_REQUEST_BODY = 2 * 1024 * 1024
IDLE_SECONDS = 900.0


@dataclass
class _Exchange:
    """One request and its response on a connection."""

    method: str
    target: str
    host: str
    started: float
    body: bytearray = field(default_factory=bytearray)
    body_encoded: bool = False
    metered: bool = False
    request_done: bool = False
    call: MeteredCall | None = None
    detected: bool = False
    status: int | None = None
    response_headers: dict[str, str] | None = None


@dataclass
class _Connection:
    task: Task
    key: tuple[int, int]  # (pid, SSL*)
    observer: http1.Http1Observer = field(default_factory=http1.Http1Observer)
    # Requests in order; the head is the one the next response answers (pipelining).
    exchanges: deque[_Exchange] = field(default_factory=deque)
    last_ts: int = 0


class Tracker:
    def __init__(self, hosts: HostTable, sink: Sink, on_fault: Fault, *,
                 epoch_of: Callable[[int], float],
                 max_connections: int = MAX_CONNECTIONS,
                 max_request_body: int = MAX_REQUEST_BODY,
                 on_ignore: Ignore | None = None) -> None:
        self.hosts = hosts
        # Told about connections that will never carry a metered call (another host,
        # HTTP/2), so the kernel stops copying them; they are no longer tracked.
        self.on_ignore = on_ignore
        self.sink = sink
        self.on_fault = on_fault
        self.epoch_of = epoch_of  # CLOCK_MONOTONIC ns → epoch seconds
        self.max_connections = max_connections
        self.max_request_body = max_request_body
        self._conns: OrderedDict[tuple[int, int], _Connection] = OrderedDict()
        self.unparsed: dict[str, int] = {}  # connections given up, by reason
        self.evicted = 0
        # One handler per HTTP event type: a dict lookup, not a chain of isinstance.
        self._handlers: dict[type, Callable[[_Connection, Any, int], None]] = {
            http1.RequestHead: self._request_head, http1.ResponseHead: self._response_head,
            http1.Body: self._body, http1.End: self._end, http1.Broken: self._broken}

    def __len__(self) -> int:
        return len(self._conns)

    def on_event(self, ev: DataEvent) -> None:
        key = (ev.task.pid, ev.conn)
        if ev.kind == CLOSE:
            conn = self._conns.pop(key, None)
            if conn is not None:
                # A message the close cuts short is no parse failure: it is abandoned below.
                ended: list[http1.Event] = [
                    e for e in conn.observer.close() if not isinstance(e, http1.Broken)]
                self._handle(conn, ended, ev.ts)
                self._abandon(conn, ev.ts, "connection closed before the response ended")
            return
        conn = self._conns.get(key)
        if conn is None:
            if ev.kind != WRITE:
                return  # joined mid-way: wait for the client's next request
            conn = self._conns[key] = _Connection(task=ev.task, key=key)
            while len(self._conns) > self.max_connections:
                _, old = self._conns.popitem(last=False)
                self.evicted += 1
                self._abandon(old, ev.ts, "connection no longer tracked (agent limit)")
        else:
            self._conns.move_to_end(key)
        conn.last_ts = ev.ts
        if ev.kind == TRUNC:
            # Bytes of one SSL call past what the kernel copies: this stream cannot be
            # followed; calls in flight end with an error, the next request starts afresh.
            self._give_up(conn, ev.ts, "plaintext larger than the agent copies per call")
            return
        was_broken = conn.observer.broken
        events = (conn.observer.from_client(ev.data) if ev.kind == WRITE
                  else conn.observer.from_server(ev.data) if ev.kind == READ else [])
        if was_broken is not None and conn.observer.broken is None:
            conn.exchanges.clear()
        self._handle(conn, events, ev.ts)

    def expire(self, now_ts: int, idle_seconds: float = IDLE_SECONDS) -> int:
        """Let go of connections idle for `idle_seconds`; returns how many."""
        idle_ns = int(idle_seconds * 1e9)
        stale = [k for k, c in self._conns.items() if now_ts - c.last_ts > idle_ns]
        for key in stale:
            self._abandon(self._conns.pop(key), now_ts, "connection idle too long")
        return len(stale)

    def close_all(self, now_ts: int) -> None:
        """The agent stops: calls in flight are recorded as cut short."""
        while self._conns:
            _, conn = self._conns.popitem(last=False)
            self._abandon(conn, now_ts, "agent stopped before the response ended")

    # -- internals ------------------------------------------------------------------------

    def _handle(self, conn: _Connection, events: list[http1.Event], ts: int) -> None:
        for event in events:
            try:
                self._one(conn, event, ts)
            except Exception:  # noqa: BLE001 - a metering fault never stops the agent
                self.on_fault("parse")
                self._give_up(conn, ts, None)
                return

    def _one(self, conn: _Connection, event: http1.Event, ts: int) -> None:
        self._handlers[type(event)](conn, event, ts)

    def _request_head(self, conn: _Connection, event: http1.RequestHead, ts: int) -> None:
        headers = event.headers
        host = host_of(headers.get("host", ""))
        provider = provider_of(self.hosts, host, tls=True, port=None, path=event.target)
        if provider is None and self._ignore(conn):
            return
        conn.exchanges.append(_Exchange(
            method=event.method, target=event.target, host=host,
            started=self.epoch_of(ts), body_encoded="content-encoding" in headers,
            # Only a metered call's body is kept (detection reads its model, stream).
            metered=provider is not None
            and operation_for(provider, event.target, event.method) is not None))

    def _body(self, conn: _Connection, event: http1.Body, ts: int) -> None:
        if event.from_client:
            ex = self._requesting(conn)
            if (ex is not None and ex.metered
                    and len(ex.body) + len(event.data) <= self.max_request_body):
                ex.body += event.data
        elif conn.exchanges and conn.exchanges[0].call is not None:
            call = conn.exchanges[0].call
            try:
                call.feed(event.data, self.epoch_of(ts))
            except Exception:  # noqa: BLE001
                call.stop_metering()
                self.on_fault("parse")

    def _end(self, conn: _Connection, event: http1.End, ts: int) -> None:
        if event.from_client:
            ex = self._requesting(conn)
            if ex is not None:
                ex.request_done = True
                self._detect(ex)
        elif conn.exchanges and conn.exchanges[0].status is not None:
            self._finish(conn, conn.exchanges.popleft(), ts, complete=True)

    def _response_head(self, conn: _Connection, event: http1.ResponseHead, ts: int) -> None:
        if event.status < 200 or not conn.exchanges:
            return
        ex = conn.exchanges[0]
        self._detect(ex)
        ex.status, ex.response_headers = event.status, event.headers
        if ex.call is not None:
            ex.call.open_response(event.headers)

    def _broken(self, conn: _Connection, event: http1.Broken, ts: int) -> None:
        reason = "http2" if conn.observer.http2 else "unparsed"
        self.unparsed[reason] = self.unparsed.get(reason, 0) + 1
        self._give_up(conn, ts, "HTTP stream not parsed")
        if conn.observer.http2:
            self._ignore(conn)  # never parsed: the connection's plaintext is of no use

    def _ignore(self, conn: _Connection) -> bool:
        """A TLS connection talks to one server: one request to a host that is no LLM's
        (or HTTP/2) says the rest of it is not metered either. Ignored unless a metered
        call is still in flight on it; returns whether it was."""
        if self.on_ignore is None or any(ex.metered for ex in conn.exchanges):
            return False
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        conn.exchanges.clear()
        conn.observer.broken = "ignored: no LLM calls"
        self.on_ignore(*conn.key)
        return True

    @staticmethod
    def _requesting(conn: _Connection) -> _Exchange | None:
        """The exchange whose request is still being received (the newest one)."""
        if conn.exchanges and not conn.exchanges[-1].request_done:
            return conn.exchanges[-1]
        return None

    def _detect(self, ex: _Exchange) -> None:
        if ex.detected:
            return
        ex.detected = True
        path = ex.target
        provider = provider_of(self.hosts, ex.host, tls=True, port=None, path=path)
        if provider is not None and ex.metered:
            ex.call = MeteredCall.start(provider, ex.host, ex.method, path, bytes(ex.body),
                                        ex.started, body_encoded=ex.body_encoded)
        ex.body = bytearray()

    def _finish(self, conn: _Connection, ex: _Exchange, ts: int, *, complete: bool,
                failure: str | None = None) -> None:
        call = ex.call
        if call is None:
            return
        if failure is not None and call.ended:
            # SDKs free the connection as soon as they read a stream's end marker.
            failure, complete = None, True
        status = str(ex.status) if ex.status is not None else "error"
        for facts in call.facts(status=status, ended=self.epoch_of(ts), complete=complete,
                                failure=failure, request_id=request_id(ex.response_headers)):
            self.sink(conn.task, facts)

    def _abandon(self, conn: _Connection, ts: int, reason: str) -> None:
        """Calls in flight on a connection that goes away end here, as cut short."""
        while conn.exchanges:
            ex = conn.exchanges.popleft()
            self._detect(ex)
            try:
                self._finish(conn, ex, ts, complete=False, failure=reason)
            except Exception:  # noqa: BLE001
                self.on_fault("record")

    def _give_up(self, conn: _Connection, ts: int, reason: str | None) -> None:
        self._abandon(conn, ts, reason or "metering fault")
        if conn.observer.broken is None:
            conn.observer.broken = reason or "metering fault"
