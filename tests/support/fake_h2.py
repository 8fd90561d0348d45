"""HTTP/2 for the fake provider: :class:`H2FakeProvider` is a :class:`FakeProvider` that
offers ALPN ``h2`` (next to ``http/1.1``) and answers the same route table over either
protocol, whichever the client negotiated.

An HTTP/2 connection (``h2`` library, server side) serves concurrent streams; each request
is an :class:`Exchange` with ``http_version`` ``"2"``, ``alpn`` ``"h2"`` and its headers as
received (pseudo-headers ``:method``, ``:path``, ``:authority``... included, in wire order).
Scripts are answered as over HTTP/1.1, minus what HTTP/2 has no room for: hop-by-hop headers
(``transfer-encoding``, ``connection``...) are dropped, every part is sent as DATA frames
(split by flow control and frame size as needed), ``chunked`` only means "no
content-length", ``close_after`` resets the stream (RST_STREAM) and ``raw`` is refused.

In-process::

    with H2FakeProvider(routes, cert=tls.cert, key=tls.key) as fp: ...

As its own process (routes JSON as for the plain fake provider)::

    argv = h2_provider_command(routes_file, cert=..., key=..., listen=["0.0.0.0:443"],
                               log=log_file, ready_file=ready_file)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions

try:
    from support.fake_provider import (
        Chunk,
        Exchange,
        FakeProvider,
        Script,
        WaitFor,
        load_routes,
        serve_until_signalled,
    )
except ImportError:  # run as a script: python tests/support/fake_h2.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from support.fake_provider import (
        Chunk,
        Exchange,
        FakeProvider,
        Script,
        WaitFor,
        load_routes,
        serve_until_signalled,
    )

__all__ = ["H2FakeProvider", "h2_provider_command"]

SCRIPT_PATH = Path(__file__).resolve()
DEFAULT_ALPN = ("h2", "http/1.1")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}


class _StreamAbort(Exception):
    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


class H2FakeProvider(FakeProvider):
    """A :class:`FakeProvider` that also speaks HTTP/2 (ALPN ``alpn``, in preference order)."""

    def __init__(self, *args: Any, alpn: Sequence[str] = DEFAULT_ALPN, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.alpn = tuple(alpn)
        if self._ssl is not None:
            self._ssl.set_alpn_protocols(list(self.alpn))

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sslobj = writer.get_extra_info("ssl_object")
        if sslobj is None or sslobj.selected_alpn_protocol() != "h2":
            await super()._serve_connection(reader, writer)
            return
        await _H2Connection(self, reader, writer, sslobj).serve()


class _H2Connection:
    def __init__(self, fp: H2FakeProvider, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, sslobj: ssl.SSLObject) -> None:
        self.fp, self.reader, self.writer = fp, reader, writer
        self.conn_id = next(fp._conn_ids)
        with fp._lock:
            fp.connection_count += 1
        peer = writer.get_extra_info("peername")
        self.tls = {
            "sni": fp._sni_seen.pop(id(sslobj), None),
            "alpn": sslobj.selected_alpn_protocol(),
            "tls_version": sslobj.version(),
            "client": f"{peer[0]}:{peer[1]}" if peer else None,
        }
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.requests: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.window = asyncio.Event()
        self.seq = 0

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    async def serve(self) -> None:
        self.h2.initiate_connection()
        self.flush()
        try:
            while True:
                try:
                    data = await self.reader.read(65536)
                except (ConnectionError, ssl.SSLError):
                    data = b""
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    self.flush()
                    break
                if not self._handle(events):
                    break
                self.flush()
                await self.writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            for task in self.tasks.values():
                task.cancel()
            if self.tasks:
                await asyncio.wait(self.tasks.values(), timeout=5)
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 3)

    def _handle(self, events: list[h2.events.Event]) -> bool:
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                headers = [(k.decode("latin-1").lower(), v.decode("latin-1"))
                           for k, v in ev.headers]
                self.requests[ev.stream_id] = (headers, bytearray())
            elif isinstance(ev, h2.events.DataReceived):
                if ev.stream_id in self.requests:
                    self.requests[ev.stream_id][1].extend(ev.data)
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                self._request_complete(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                task = self.tasks.get(ev.stream_id)
                if task is not None:
                    task.cancel()
            elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self.window.set()
                self.window = asyncio.Event()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                return False
        return True

    def _request_complete(self, stream_id: int) -> None:
        headers, body = self.requests.pop(stream_id, ([], bytearray()))
        pseudo = dict(h for h in headers if h[0].startswith(":"))
        fp = self.fp
        ex = Exchange(
            id=next(fp._ids), conn_id=self.conn_id, seq_on_conn=self.seq,
            method=pseudo.get(":method", ""), path=pseudo.get(":path", ""), http_version="2",
            headers=headers, body=bytes(body), received_at=time.monotonic(), **self.tls,
        )
        self.seq += 1
        with fp._changed:
            fp._exchanges.append(ex)
            fp._changed.notify_all()
        fp._log(ex.request_record())
        self.tasks[stream_id] = asyncio.get_running_loop().create_task(
            self._respond(stream_id, ex))

    async def _send_data(self, stream_id: int, data: bytes) -> None:
        while data:
            window = self.h2.local_flow_control_window(stream_id)
            if window <= 0:
                await self.window.wait()
                continue
            n = min(window, self.h2.max_outbound_frame_size, len(data))
            self.h2.send_data(stream_id, data[:n])
            data = data[n:]
            self.flush()
            await self.writer.drain()

    async def _respond(self, stream_id: int, ex: Exchange) -> None:
        fp = self.fp
        try:
            script: Script = fp._router.pick(ex)
            if script.headers_delay:
                await asyncio.sleep(script.headers_delay)
            ex.status = script.status
            if script.raw is not None:
                raise _StreamAbort("error: raw responses are HTTP/1.1 only")
            parts = script.parts()
            headers = [(":status", str(script.status))]
            headers += [(k.lower(), v) for k, v in script.headers
                        if k.lower() not in _HOP_BY_HOP]
            if not script.chunked and not any(k == "content-length" for k, _ in headers):
                total = sum(len(p.data) for p in parts if isinstance(p, Chunk))
                headers.append(("content-length", str(total)))
            self.h2.send_headers(stream_id, [(k.encode(), v.encode()) for k, v in headers])
            self.flush()
            await self.writer.drain()
            sent = 0
            for part in parts:
                if script.close_after is not None and sent >= script.close_after:
                    raise _StreamAbort("closed_early")
                if isinstance(part, WaitFor):
                    await fp._wait(part)
                    continue
                if part.delay:
                    await asyncio.sleep(part.delay)
                ex.sent_chunks_at.append(time.monotonic())
                sent += 1
                await self._send_data(stream_id, part.data)
            if script.close_after is not None and sent >= script.close_after:
                raise _StreamAbort("closed_early")
            self.h2.end_stream(stream_id)
            self.flush()
            await self.writer.drain()
            ex.outcome = "complete"
        except _StreamAbort as a:
            ex.outcome = a.outcome
            self._reset(stream_id)
        except Exception as e:  # noqa: BLE001 - the fake provider's _Abort (wait timeout) too
            outcome = getattr(e, "outcome", None)
            if outcome is not None:
                ex.outcome = outcome
            elif isinstance(e, ConnectionError | OSError | h2.exceptions.StreamClosedError):
                ex.outcome = "client_gone"
            else:
                ex.outcome = f"error: {e!r}"
            self._reset(stream_id)
        except asyncio.CancelledError:
            ex.outcome = "client_gone"
            raise
        finally:
            ex.finished_at = time.monotonic()
            fp._log(ex.response_record())
            fp._notify()
            self.tasks.pop(stream_id, None)

    def _reset(self, stream_id: int) -> None:
        with contextlib.suppress(Exception):
            self.h2.reset_stream(stream_id)
            self.flush()


# --- subprocess mode ----------------------------------------------------------------------


def h2_provider_command(
    routes: str | os.PathLike[str],
    *,
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
    listen: Sequence[str] = ("127.0.0.1:0",),
    log: str | os.PathLike[str] | None = None,
    ready_file: str | os.PathLike[str] | None = None,
    python: str = sys.executable,
    alpn: Sequence[str] = DEFAULT_ALPN,
) -> list[str]:
    """argv running :class:`H2FakeProvider` standalone (same options as `provider_command`)."""
    argv = [python, str(SCRIPT_PATH), "--routes", str(routes), "--alpn", ",".join(alpn)]
    for spec in listen:
        argv += ["--listen", spec]
    if cert is not None and key is not None:
        argv += ["--cert", str(cert), "--key", str(key)]
    if log is not None:
        argv += ["--log", str(log)]
    if ready_file is not None:
        argv += ["--ready-file", str(ready_file)]
    return argv


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="HTTPS fake LLM provider (HTTP/2 and HTTP/1.1)")
    ap.add_argument("--listen", action="append", default=[], help="HOST:PORT, repeatable")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--routes", required=True)
    ap.add_argument("--log")
    ap.add_argument("--ready-file")
    ap.add_argument("--alpn", default=",".join(DEFAULT_ALPN), help="offered, by preference")
    args = ap.parse_args(argv)
    routes, default = load_routes(args.routes)
    fp = H2FakeProvider(routes, cert=args.cert, key=args.key,
                        listen=args.listen or ["127.0.0.1:0"], default=default,
                        log_path=args.log, alpn=[a for a in args.alpn.split(",") if a])

    return serve_until_signalled(fp, args.ready_file, announce=False)


if __name__ == "__main__":
    sys.exit(_main())
