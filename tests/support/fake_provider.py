"""A real HTTPS fake LLM provider for end-to-end tests.

It speaks HTTP/1.1 (parsed and framed by ``h11``) over TLS (ALPN ``http/1.1``) with keep-alive,
answers from a scripted route table, records every request it receives, and timestamps every
body part it sends.  Two ways to run it:

In-process (a background thread running an asyncio loop)::

    tls = make_provider_tls(tmp_path)                     # provider CA + leaf for DEFAULT_HOSTS
    routes = {("POST", "/v1/chat/completions"): Script.json(CHAT_RESPONSE)}
    with FakeProvider(routes, cert=tls.cert, key=tls.key) as fp:    # 127.0.0.1, random port
        client = openai.OpenAI(base_url=f"{fp.url}/v1", api_key="k",
                               http_client=httpx.Client(verify=tls.client_context()))
        ...
        assert fp.requests[0].json()["model"] == "gpt-4o-mini"

As its own process (e.g. inside a provider network namespace), with routes from JSON::

    argv = provider_command(routes_file, cert=..., key=..., listen=["0.0.0.0:443", "[::]:443"],
                            log=log_file, ready_file=ready_file)
    proc = pod.provider.popen(argv)                        # or subprocess.Popen(argv)
    ready = wait_ready(ready_file, proc)                   # {"pid":..., "listening": [[h, p]]}
    ...
    exchanges = read_request_log(log_file)

A response is a :class:`Script`: status, headers and a body made of parts.  Each part is a
:class:`Chunk` (bytes + a delay slept *before* sending it) or a :class:`WaitFor` (blocks the
stream until a ``threading.Event`` is set or a file exists).  With ``chunked=True`` every
chunk goes out as one HTTP/1.1 chunk (what SSE streams need); otherwise the body carries a
``Content-Length`` of the sum of all parts (the parts may still be paced).  Faults:
``close_after=n`` drops the connection after ``n`` chunks (a truncated body: the terminating
zero-chunk / the rest of the Content-Length never comes), ``close_mode="reset"`` makes that a
TCP RST instead of a TLS close_notify + FIN, ``raw=b"..."`` writes arbitrary bytes instead of
a framed response (then closes), and malformed bodies are just bytes.

JSON routes file (``--routes``)::

    {"routes": [
       {"method": "POST", "path": "/v1/chat/completions",
        "status": 200, "headers": [["content-type", "text/event-stream"]], "chunked": true,
        "body": [{"data": "data: {...}\\n\\n", "delay": 0.05},
                 {"wait_for_file": "/var/tmp/release", "timeout": 30},
                 {"data_b64": "ZGF0YTogW0RPTkVdCgo="}],
        "close_after": null, "close_mode": "close"},
       {"method": "POST", "path": "/v1/messages", "json": {...}, "status": 200},
       {"method": "POST", "path": "/v1/x", "chunked": true,
        "body": [{"file": "a.sse", "split_sse": true, "delay": 0.01}]},
       {"method": "GET", "path": "/retry", "sequence": [{"status": 500}, {"status": 200}]}
     ],
     "default": {"status": 404, "json": {"error": "no route"}}}

``body`` may also be a plain string; ``file`` paths are relative to the routes file and
``split_sse`` makes one chunk per SSE event (each after ``delay``); ``raw``/``raw_b64`` (text
or base64) replaces the whole response; ``headers_delay``, ``reason``, ``keep_alive``,
``close_after`` and ``close_mode`` are the :class:`Script` fields of the same names.  A
``sequence`` answers its scripts in turn and then keeps repeating the last one.

Request log (``--log``, JSON lines, flushed per line): a ``{"event": "request", ...}`` line as
soon as a request has been read (before the response starts, so a test can wait for it while
the stream is held by a ``wait_for_file``), and a ``{"event": "response", "id": ...}`` line
when the response has ended, with ``sent_chunks_at`` and the outcome.
:func:`read_request_log` merges them into :class:`Exchange` objects.  Timestamps are
``time.monotonic()`` values (CLOCK_MONOTONIC: comparable across processes on one Linux host).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import h11

__all__ = [
    "DEFAULT_PROVIDER_HOSTS",
    "Chunk",
    "Exchange",
    "FakeProvider",
    "ProviderTLS",
    "Route",
    "Script",
    "WaitFor",
    "load_routes",
    "make_provider_tls",
    "provider_command",
    "read_request_log",
    "split_sse",
    "wait_ready",
]

DEFAULT_PROVIDER_HOSTS: tuple[str, ...] = (
    "api.openai.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "api.mistral.ai",
    "api.groq.com",
    "api.deepseek.com",
    "api.x.ai",
    "api.together.xyz",
    "openrouter.ai",
    "*.openai.azure.com",
    "localhost",
)

SCRIPT_PATH = Path(__file__).resolve()


# --- scripts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One body part: sleep ``delay`` seconds, then send ``data`` (one HTTP chunk if chunked)."""

    data: bytes
    delay: float = 0.0


@dataclass(frozen=True)
class WaitFor:
    """Hold the response until ``event`` is set or ``file`` exists (whichever is given).

    After ``timeout`` seconds the connection is aborted (outcome ``"wait_timeout"``) so a
    forgotten release fails a test instead of hanging it.
    """

    event: threading.Event | None = None
    file: str | os.PathLike[str] | None = None
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if (self.event is None) == (self.file is None):
            raise ValueError("WaitFor needs exactly one of event= or file=")

    def released(self) -> bool:
        if self.event is not None:
            return self.event.is_set()
        assert self.file is not None
        return os.path.exists(self.file)


BodyPart: TypeAlias = Chunk | WaitFor | bytes | tuple[bytes, float]
CloseMode = Literal["close", "reset"]


@dataclass(frozen=True)
class Script:
    """A scripted response.

    ``body``: bytes or a sequence of parts (``bytes``, ``(bytes, delay)``, :class:`Chunk`,
    :class:`WaitFor`).  ``chunked``: HTTP/1.1 chunked transfer encoding, one chunk per part
    (otherwise Content-Length = total).  ``headers_delay``: sleep before the status line.
    ``close_after``: after that many data parts, drop the connection (truncated body).
    ``close_mode``: ``"close"`` (TLS close_notify + FIN) or ``"reset"`` (TCP RST).
    ``keep_alive=False`` answers with ``Connection: close``.  ``raw``: written verbatim
    instead of a framed response, then the connection is closed.
    """

    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    body: bytes | Sequence[BodyPart] = b""
    chunked: bool = False
    reason: str = ""
    headers_delay: float = 0.0
    close_after: int | None = None
    close_mode: CloseMode = "close"
    keep_alive: bool = True
    raw: bytes | None = None

    def parts(self) -> list[Chunk | WaitFor]:
        raw_parts: Sequence[BodyPart] = (
            [self.body] if isinstance(self.body, bytes | bytearray) else self.body
        )
        out: list[Chunk | WaitFor] = []
        for p in raw_parts:
            if isinstance(p, Chunk | WaitFor):
                out.append(p)
            elif isinstance(p, bytes | bytearray):
                out.append(Chunk(bytes(p)))
            else:
                data, delay = p
                out.append(Chunk(bytes(data), float(delay)))
        return out

    @classmethod
    def json(
        cls, obj: Any, status: int = 200, headers: Sequence[tuple[str, str]] = (), **kw: Any
    ) -> Script:
        """A JSON response with Content-Length."""
        body = json.dumps(obj).encode()
        hdrs = [("content-type", "application/json"), *headers]
        return cls(status=status, headers=hdrs, body=body, **kw)

    @classmethod
    def sse(
        cls,
        events: Iterable[bytes | str | Chunk | WaitFor],
        *,
        delay: float = 0.0,
        status: int = 200,
        headers: Sequence[tuple[str, str]] = (),
        **kw: Any,
    ) -> Script:
        """A chunked ``text/event-stream``: one chunk per event, ``delay`` before each.

        ``str``/``bytes`` events are sent as given (include the ``data: ...\\n\\n`` framing);
        pass :class:`Chunk`/:class:`WaitFor` for per-part control.
        """
        parts: list[BodyPart] = []
        for ev in events:
            if isinstance(ev, Chunk | WaitFor):
                parts.append(ev)
            else:
                parts.append(Chunk(ev.encode() if isinstance(ev, str) else ev, delay))
        hdrs = [("content-type", "text/event-stream"), ("cache-control", "no-cache"), *headers]
        return cls(status=status, headers=hdrs, body=parts, chunked=True, **kw)


def split_sse(data: bytes | str) -> list[bytes]:
    """Split an SSE transcript into events, each keeping its trailing blank line."""
    raw = data.encode() if isinstance(data, str) else data
    raw = raw.replace(b"\r\n", b"\n")
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    return [e + b"\n\n" for e in events]


# --- recorded exchanges -------------------------------------------------------------------


@dataclass
class Exchange:
    """One request as received, plus what happened to its response.

    ``headers`` keep wire order with lower-cased names.  ``sent_chunks_at[i]`` is the
    ``time.monotonic()`` taken just *before* data part ``i`` was written (WaitFor parts do not
    count), so the part cannot have reached anyone earlier: a client that holds part ``i``
    at a time before ``sent_chunks_at[i + 1]`` provably got it while the provider was still
    streaming.  ``outcome``: ``"pending"`` while streaming, then ``"complete"``,
    ``"closed_early"`` (close_after), ``"raw"``, ``"wait_timeout"``, ``"client_gone"`` or
    ``"error: ..."``.
    """

    id: int
    conn_id: int
    seq_on_conn: int
    method: str
    path: str
    http_version: str
    headers: list[tuple[str, str]]
    body: bytes
    received_at: float
    sni: str | None = None
    alpn: str | None = None
    tls_version: str | None = None
    client: str | None = None
    status: int | None = None
    sent_chunks_at: list[float] = field(default_factory=list)
    finished_at: float | None = None
    outcome: str = "pending"

    @property
    def path_only(self) -> str:
        return self.path.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def json(self) -> Any:
        return json.loads(self.body)

    def request_record(self) -> dict[str, Any]:
        try:
            text: str | None = self.body.decode()
        except UnicodeDecodeError:
            text = None
        return {
            "event": "request",
            "id": self.id,
            "conn_id": self.conn_id,
            "seq_on_conn": self.seq_on_conn,
            "method": self.method,
            "path": self.path,
            "http_version": self.http_version,
            "headers": [list(h) for h in self.headers],
            "body": text,
            "body_b64": base64.b64encode(self.body).decode(),
            "received_at": self.received_at,
            "sni": self.sni,
            "alpn": self.alpn,
            "tls_version": self.tls_version,
            "client": self.client,
        }

    def response_record(self) -> dict[str, Any]:
        return {
            "event": "response",
            "id": self.id,
            "status": self.status,
            "sent_chunks_at": self.sent_chunks_at,
            "finished_at": self.finished_at,
            "outcome": self.outcome,
        }


def read_request_log(path: str | os.PathLike[str]) -> list[Exchange]:
    """Parse a ``--log`` file into exchanges (responses merged in; a torn last line is skipped)."""
    by_id: dict[int, Exchange] = {}
    p = Path(path)
    if not p.exists():
        return []
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # being written right now
        if rec.get("event") == "request":
            by_id[rec["id"]] = Exchange(
                id=rec["id"],
                conn_id=rec["conn_id"],
                seq_on_conn=rec["seq_on_conn"],
                method=rec["method"],
                path=rec["path"],
                http_version=rec["http_version"],
                headers=[(k, v) for k, v in rec["headers"]],
                body=base64.b64decode(rec["body_b64"]),
                received_at=rec["received_at"],
                sni=rec.get("sni"),
                alpn=rec.get("alpn"),
                tls_version=rec.get("tls_version"),
                client=rec.get("client"),
            )
        elif rec.get("event") == "response" and rec["id"] in by_id:
            ex = by_id[rec["id"]]
            ex.status = rec["status"]
            ex.sent_chunks_at = list(rec["sent_chunks_at"])
            ex.finished_at = rec["finished_at"]
            ex.outcome = rec["outcome"]
    return [by_id[k] for k in sorted(by_id)]


# --- routing ------------------------------------------------------------------------------

Handler: TypeAlias = Callable[[Exchange], Script]
Route: TypeAlias = Script | Sequence[Script] | Handler
NOT_FOUND = Script.json({"error": {"message": "fake provider: no route", "type": "not_found"}}, 404)


class _Router:
    def __init__(
        self,
        routes: Mapping[tuple[str, str], Route] | None,
        handler: Handler | None,
        default: Script | None,
    ) -> None:
        self._routes = {(m.upper(), p): r for (m, p), r in (routes or {}).items()}
        self._handler = handler
        self._default = default or NOT_FOUND
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def set_route(self, method: str, path: str, route: Route) -> None:
        with self._lock:
            self._routes[(method.upper(), path)] = route
            self._counts.pop((method.upper(), path), None)

    def pick(self, ex: Exchange) -> Script:
        key = (ex.method.upper(), ex.path_only)
        with self._lock:
            route = self._routes.get(key)
            if route is None:
                route = self._routes.get((ex.method.upper(), ex.path))
                key = (ex.method.upper(), ex.path)
            n = self._counts.get(key, 0)
            self._counts[key] = n + 1
        if route is None:
            return self._handler(ex) if self._handler is not None else self._default
        if isinstance(route, Script):
            return route
        if callable(route):
            return route(ex)
        seq = list(route)
        return seq[min(n, len(seq) - 1)]


_SPEC_KEYS = {
    "method", "path", "status", "headers", "json", "body", "chunked", "reason", "headers_delay",
    "close_after", "close_mode", "keep_alive", "raw", "raw_b64",
}  # fmt: skip
_ITEM_KEYS = {"data", "data_b64", "delay", "file", "split_sse", "wait_for_file", "timeout"}


def _script_from_spec(spec: Mapping[str, Any], base: Path) -> Script:
    unknown = set(spec) - _SPEC_KEYS
    if unknown:  # a typo must not silently change what a test exercises
        raise ValueError(f"unknown route keys {sorted(unknown)} in {dict(spec)!r}")
    for item in spec.get("body", []) if isinstance(spec.get("body"), list) else []:
        if isinstance(item, dict) and set(item) - _ITEM_KEYS:
            raise ValueError(f"unknown body item keys {sorted(set(item) - _ITEM_KEYS)}")
    if spec.get("close_mode", "close") not in ("close", "reset"):
        raise ValueError(f"close_mode must be close or reset, not {spec['close_mode']!r}")
    headers = [(str(k), str(v)) for k, v in spec.get("headers", [])]
    parts: list[BodyPart] = []
    if "json" in spec:
        parts.append(json.dumps(spec["json"]).encode())
        if not any(k.lower() == "content-type" for k, _ in headers):
            headers.insert(0, ("content-type", "application/json"))
    body = spec.get("body", [])
    if isinstance(body, str):
        body = [{"data": body}]
    if parts and body:
        raise ValueError("a route has either json or body, not both")
    for item in body:
        if isinstance(item, str):
            parts.append(Chunk(item.encode()))
        elif "wait_for_file" in item:
            parts.append(
                WaitFor(file=item["wait_for_file"], timeout=float(item.get("timeout", 30)))
            )
        elif "file" in item:
            data = (base / item["file"]).read_bytes()
            delay = float(item.get("delay", 0.0))
            pieces = split_sse(data) if item.get("split_sse") else [data]
            parts.extend(Chunk(e, delay) for e in pieces)
        elif "data_b64" in item:
            parts.append(Chunk(base64.b64decode(item["data_b64"]), float(item.get("delay", 0))))
        else:
            parts.append(Chunk(str(item["data"]).encode(), float(item.get("delay", 0))))
    raw = spec.get("raw")
    raw_b64 = spec.get("raw_b64")
    return Script(
        status=int(spec.get("status", 200)),
        headers=headers,
        body=parts,
        chunked=bool(spec.get("chunked", False)),
        reason=str(spec.get("reason", "")),
        headers_delay=float(spec.get("headers_delay", 0.0)),
        close_after=spec.get("close_after"),
        close_mode=spec.get("close_mode", "close"),
        keep_alive=bool(spec.get("keep_alive", True)),
        raw=base64.b64decode(raw_b64) if raw_b64 else (raw.encode() if raw else None),
    )


def load_routes(
    path: str | os.PathLike[str],
) -> tuple[dict[tuple[str, str], Route], Script | None]:
    """Load a JSON routes file (format in the module docstring) into (routes, default)."""
    p = Path(path)
    spec = json.loads(p.read_text())
    base = p.resolve().parent
    routes: dict[tuple[str, str], Route] = {}
    for r in spec.get("routes", []):
        key = (str(r.get("method", "POST")).upper(), str(r["path"]))
        if "sequence" in r:
            routes[key] = [_script_from_spec(s, base) for s in r["sequence"]]
        else:
            routes[key] = _script_from_spec(r, base)
    default = _script_from_spec(spec["default"], base) if spec.get("default") else None
    return routes, default


# --- TLS material -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderTLS:
    """Files of a provider CA (what the sidecar gets as --upstream-ca-bundle) and a leaf."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """A client SSLContext trusting only the provider CA (for httpx ``verify=``)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx


def make_provider_tls(
    directory: str | os.PathLike[str],
    hosts: Sequence[str] = DEFAULT_PROVIDER_HOSTS,
    ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
    *,
    ca_name: str = "podtally test provider CA",
) -> ProviderTLS:
    """Write a provider CA and a server cert for ``hosts``/``ip_addresses`` into ``directory``."""
    from podtally.certs import generate_ca, issue_server_cert  # lazy: the CLI does not need it

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_pem, ca_key = generate_ca(ca_name, valid_days=30)
    leaf_pem, leaf_key = issue_server_cert(ca_pem, ca_key, list(hosts), list(ip_addresses))
    tls = ProviderTLS(
        d / "provider-ca.pem", d / "provider-ca.key", d / "server.pem", d / "server.key"
    )
    for path, data in [
        (tls.ca_cert, ca_pem),
        (tls.ca_key, ca_key),
        (tls.cert, leaf_pem),
        (tls.key, leaf_key),
    ]:
        path.write_bytes(data)
        if path.suffix == ".key":
            path.chmod(0o600)
    return tls


def _server_ssl_context(
    cert: str | os.PathLike[str], key: str | os.PathLike[str], sni_seen: dict[int, str | None]
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["http/1.1"])

    def on_sni(obj: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        sni_seen[id(obj)] = name

    ctx.sni_callback = on_sni
    return ctx


# --- the server ---------------------------------------------------------------------------


class _Abort(Exception):
    def __init__(self, outcome: str, mode: CloseMode = "close") -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.mode = mode


def _send(conn: h11.Connection, writer: asyncio.StreamWriter, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        writer.write(data)


def _parse_listen(spec: str) -> tuple[str | None, int]:
    host, _, port = spec.rpartition(":")
    host = host.strip("[]")
    return (None if host in ("", "*") else host), int(port)


class FakeProvider:
    """The fake provider server.  Use as a context manager or call start()/stop().

    ``routes`` map ``(METHOD, path)`` (path without query string, or the exact target) to a
    :class:`Script`, a list of scripts (answered in turn, the last one repeating) or a
    callable ``(Exchange) -> Script``.  ``handler`` answers anything unrouted; otherwise
    ``default`` (404 JSON).  ``cert``/``key`` None serves plain HTTP.
    """

    def __init__(
        self,
        routes: Mapping[tuple[str, str], Route] | None = None,
        *,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        listen: Sequence[str] | str = "127.0.0.1:0",
        handler: Handler | None = None,
        default: Script | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self._router = _Router(routes, handler, default)
        self._listen = [listen] if isinstance(listen, str) else list(listen)
        self._sni_seen: dict[int, str | None] = {}
        self._ssl = _server_ssl_context(cert, key, self._sni_seen) if cert and key else None
        self._log_path = Path(log_path) if log_path else None
        self._log_file: Any = None
        self._lock = threading.Lock()
        self._exchanges: list[Exchange] = []
        self._changed = threading.Condition(self._lock)
        self._ids = itertools.count()
        self._conn_ids = itertools.count()
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.Server] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.addresses: list[tuple[str, int]] = []
        self.connection_count = 0

    # -- public API --

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    @property
    def host(self) -> str:
        return self.addresses[0][0]

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl else "http"
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}"

    @property
    def requests(self) -> list[Exchange]:
        """Snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._exchanges)

    def set_route(self, method: str, path: str, route: Route) -> None:
        self._router.set_route(method, path, route)

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> list[Exchange]:
        """Block until at least ``n`` requests have been received."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._exchanges) >= n, timeout):
                raise TimeoutError(f"fake provider saw {len(self._exchanges)} requests, not {n}")
            return list(self._exchanges)

    def wait_for_outcome(self, index: int = -1, timeout: float = 10.0) -> Exchange:
        """Block until the response to request ``index`` has ended; returns the exchange."""
        with self._changed:
            ok = self._changed.wait_for(
                lambda: bool(self._exchanges) and self._exchanges[index].outcome != "pending",
                timeout,
            )
            if not ok:
                raise TimeoutError("fake provider response still pending")
            return self._exchanges[index]

    def start(self) -> FakeProvider:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_servers())
            except BaseException as e:  # report bind errors to the caller
                errors.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-provider", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        with contextlib.suppress(Exception):
            fut.result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- asyncio side --

    async def _start_servers(self) -> None:
        if self._log_path:
            self._log_file = open(self._log_path, "a", buffering=1)  # noqa: SIM115
        for spec in self._listen:
            host, port = _parse_listen(spec)
            srv = await asyncio.start_server(
                self._on_connection,
                host=host,
                port=port,
                ssl=self._ssl,
                ssl_handshake_timeout=10 if self._ssl else None,
                ssl_shutdown_timeout=2 if self._ssl else None,
                reuse_address=True,
            )
            self._servers.append(srv)
            for sock in srv.sockets:
                addr = sock.getsockname()
                self.addresses.append((addr[0], addr[1]))

    async def _shutdown(self) -> None:
        for srv in self._servers:
            srv.close()
        for t in list(self._conn_tasks):
            t.cancel()
        if self._conn_tasks:
            await asyncio.wait(self._conn_tasks, timeout=5)
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2)
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def _log(self, record: dict[str, Any]) -> None:
        if self._log_file:
            self._log_file.write(json.dumps(record) + "\n")
            self._log_file.flush()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        try:
            await self._serve_connection(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
        finally:
            self._conn_tasks.discard(task)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn_id = next(self._conn_ids)
        with self._lock:
            self.connection_count += 1
        sslobj = writer.get_extra_info("ssl_object")
        sni = alpn = tls_version = None
        if sslobj is not None:
            sni = self._sni_seen.pop(id(sslobj), None)
            alpn = sslobj.selected_alpn_protocol()
            tls_version = sslobj.version()
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if peer else None
        conn = h11.Connection(h11.SERVER)
        seq = 0
        close_mode: CloseMode = "close"
        try:
            while True:
                ex = await self._read_request(conn, reader, writer, conn_id, seq)
                if ex is None:
                    break
                ex.sni, ex.alpn, ex.tls_version, ex.client = sni, alpn, tls_version, client
                with self._changed:
                    self._exchanges.append(ex)
                    self._changed.notify_all()
                self._log(ex.request_record())
                try:
                    script = self._router.pick(ex)
                    await self._respond(conn, writer, ex, script)
                except _Abort as a:
                    ex.outcome, close_mode = a.outcome, a.mode
                except (ConnectionError, OSError, h11.LocalProtocolError) as e:
                    ex.outcome = "client_gone" if isinstance(e, OSError) else f"error: {e!r}"
                except asyncio.CancelledError:
                    ex.outcome = "cancelled"
                    raise
                except Exception as e:  # a broken handler must not hang the client
                    ex.outcome = f"error: {e!r}"
                    close_mode = "reset"
                finally:
                    ex.finished_at = time.monotonic()
                    self._log(ex.response_record())
                    self._notify()
                if ex.outcome != "complete":
                    break
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
                seq += 1
        except (ConnectionError, OSError, h11.RemoteProtocolError):
            pass
        except asyncio.CancelledError:  # shutting down: no graceful TLS close with idle peers
            writer.transport.abort()
            raise
        await self._close(writer, close_mode)

    async def _read_request(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn_id: int,
        seq: int,
    ) -> Exchange | None:
        req: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if req is not None and conn.they_are_waiting_for_100_continue:
                    _send(conn, writer, h11.InformationalResponse(status_code=100, headers=[]))
                    await writer.drain()
                try:
                    data = await reader.read(65536)
                except (ConnectionError, ssl.SSLError):
                    data = b""
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                req = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert req is not None
                return Exchange(
                    id=next(self._ids),
                    conn_id=conn_id,
                    seq_on_conn=seq,
                    method=req.method.decode(),
                    path=req.target.decode(),
                    http_version=req.http_version.decode(),
                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in req.headers],
                    body=bytes(body),
                    received_at=time.monotonic(),
                )
            elif isinstance(event, h11.ConnectionClosed):
                return None
            else:  # pragma: no cover - PAUSED etc.
                return None

    async def _wait(self, w: WaitFor) -> None:
        deadline = time.monotonic() + w.timeout
        while not w.released():
            if time.monotonic() > deadline:
                raise _Abort("wait_timeout", "close")
            await asyncio.sleep(0.005)

    async def _respond(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, ex: Exchange, script: Script
    ) -> None:
        if script.headers_delay:
            await asyncio.sleep(script.headers_delay)
        ex.status = script.status
        if script.raw is not None:
            ex.sent_chunks_at.append(time.monotonic())
            writer.write(script.raw)
            await writer.drain()
            raise _Abort("raw", script.close_mode)

        parts = script.parts()
        headers = list(script.headers)
        names = {k.lower() for k, _ in headers}
        if script.chunked:
            if "transfer-encoding" not in names:
                headers.append(("transfer-encoding", "chunked"))
        elif "content-length" not in names and ex.method != "HEAD":
            total = sum(len(p.data) for p in parts if isinstance(p, Chunk))
            headers.append(("content-length", str(total)))
        if not script.keep_alive and "connection" not in names:
            headers.append(("connection", "close"))
        _send(
            conn,
            writer,
            h11.Response(
                status_code=script.status,
                headers=[(k.encode(), v.encode()) for k, v in headers],
                reason=script.reason.encode(),
            ),
        )
        await writer.drain()
        sent = 0
        for part in parts:
            if script.close_after is not None and sent >= script.close_after:
                raise _Abort("closed_early", script.close_mode)
            if isinstance(part, WaitFor):
                await self._wait(part)
                continue
            if part.delay:
                await asyncio.sleep(part.delay)
            # Stamp *before* writing: chunk i cannot have reached anyone before sent_chunks_at[i].
            ex.sent_chunks_at.append(time.monotonic())
            sent += 1
            if part.data:  # h11 would turn an empty Data into nothing anyway
                _send(conn, writer, h11.Data(data=part.data))
                await writer.drain()
        if script.close_after is not None and sent >= script.close_after:
            raise _Abort("closed_early", script.close_mode)
        _send(conn, writer, h11.EndOfMessage())
        await writer.drain()
        ex.outcome = "complete"

    async def _close(self, writer: asyncio.StreamWriter, mode: CloseMode) -> None:
        if mode == "reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 3)


# --- subprocess mode ----------------------------------------------------------------------


def provider_command(
    routes: str | os.PathLike[str],
    *,
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
    listen: Sequence[str] = ("127.0.0.1:0",),
    log: str | os.PathLike[str] | None = None,
    ready_file: str | os.PathLike[str] | None = None,
    python: str = sys.executable,
) -> list[str]:
    """argv that runs this module as a standalone server (hand it to Popen or Netns.popen)."""
    argv = [python, str(SCRIPT_PATH), "--routes", str(routes)]
    for spec in listen:
        argv += ["--listen", spec]
    if cert is not None and key is not None:
        argv += ["--cert", str(cert), "--key", str(key)]
    if log is not None:
        argv += ["--log", str(log)]
    if ready_file is not None:
        argv += ["--ready-file", str(ready_file)]
    return argv


def wait_ready(
    ready_file: str | os.PathLike[str],
    proc: subprocess.Popen[Any] | None = None,
    timeout: float = 20.0,
) -> dict[str, Any]:
    """Wait for the subprocess's ready file; returns ``{"pid", "listening": [[host, port]...]}``."""
    p = Path(ready_file)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.exists():
            return dict(json.loads(p.read_text()))
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"fake provider exited with {proc.returncode} before it was ready")
        time.sleep(0.02)
    raise TimeoutError(f"fake provider not ready after {timeout}s ({p} missing)")


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="HTTPS fake LLM provider for podtally tests")
    ap.add_argument("--listen", action="append", default=[], help="HOST:PORT, repeatable; [::]:443")
    ap.add_argument("--cert", help="server cert PEM (leaf, optionally followed by chain)")
    ap.add_argument("--key", help="server key PEM")
    ap.add_argument("--routes", required=True, help="JSON routes file")
    ap.add_argument("--log", help="append the request log here as JSON lines")
    ap.add_argument("--ready-file", help="written (atomically) with pid and ports once listening")
    args = ap.parse_args(argv)
    if bool(args.cert) != bool(args.key):
        ap.error("--cert and --key go together")
    routes, default = load_routes(args.routes)
    fp = FakeProvider(
        routes,
        cert=args.cert,
        key=args.key,
        listen=args.listen or ["127.0.0.1:0"],
        default=default,
        log_path=args.log,
    )

    return serve_until_signalled(fp, args.ready_file, announce=True)


def serve_until_signalled(fp: FakeProvider, ready_file: str | None, *, announce: bool) -> int:
    """A provider process's life: listen, say where (atomically in `ready_file`), serve until
    SIGTERM or SIGINT, shut down."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        await fp._start_servers()
        fp._loop = loop
        info = {"pid": os.getpid(), "listening": [list(a) for a in fp.addresses]}
        if announce:
            print(f"fake provider listening {json.dumps(info)}", flush=True)
        if ready_file:
            tmp = f"{ready_file}.tmp"
            Path(tmp).write_text(json.dumps(info))
            os.replace(tmp, ready_file)
        try:
            await asyncio.Event().wait()
        finally:
            await fp._shutdown()

    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(_main())
