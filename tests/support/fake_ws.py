"""A real TLS WebSocket fake of OpenAI's Realtime endpoint (wss://api.openai.com/v1/realtime).

It runs the `websockets` asyncio server in a background thread with the provider's TLS
certificate (from :func:`support.fake_provider.make_provider_tls`), and answers every
connection from a scripted list of steps: send some server frames (a recorded session),
optionally after the client sent an event of a given type. It records what it saw: the
handshake request (path, headers) and every client frame.

    server = FakeRealtimeServer(cert=tls.cert, key=tls.key).start()
    server.script = [Reply(None, [session_created]),             # on connect
                     Reply("response.create", recorded_frames)]  # when the client asks
    ...
    conn = server.wait_connection()
    conn.path, conn.headers, conn.client_frames

Frames are bytes and go out as TEXT frames, the way OpenAI sends them. A step's frames may
be any iterable (a generator keeps a long stream out of the test process's memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve

__all__ = ["FakeRealtimeServer", "Reply", "WsConnection"]


@dataclass
class Reply:
    """Wait until the client sent an event of type `after` (None: right away), then send."""

    after: str | None
    frames: Iterable[bytes]


@dataclass
class WsConnection:
    path: str
    headers: list[tuple[str, str]]
    client_frames: list[bytes] = field(default_factory=list)
    sent: int = 0
    finished: threading.Event = field(default_factory=threading.Event)
    error: str | None = None

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def client_types(self) -> list[str]:
        out = []
        for f in self.client_frames:
            try:
                out.append(str(json.loads(f).get("type")))
            except (ValueError, AttributeError):
                out.append("?")
        return out


class FakeRealtimeServer:
    def __init__(self, *, cert: str | os.PathLike[str], key: str | os.PathLike[str],
                 host: str = "127.0.0.1", compression: str | None = "deflate") -> None:
        self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ssl.load_cert_chain(str(cert), str(key))
        self._ssl.set_alpn_protocols(["http/1.1"])
        self._host = host
        self._compression = compression
        self.script: list[Reply] = []
        self.connections: list[WsConnection] = []
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- public API --

    def start(self) -> FakeRealtimeServer:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(self._serve())
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                errors.append(e)
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-realtime", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def close() -> None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def wait_connection(self, n: int = 1, timeout: float = 10) -> WsConnection:
        """The n-th connection (1-based) once the server has finished its script for it."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.connections) >= n, timeout):
                raise TimeoutError(f"{len(self.connections)} WebSocket connections, wanted {n}")
            conn = self.connections[n - 1]
        if not conn.finished.wait(timeout):
            raise TimeoutError("fake realtime server still running its script")
        return conn

    # -- asyncio side --

    async def _serve(self) -> Server:
        return await serve(self._handle, self._host, 0, ssl=self._ssl,
                           compression=self._compression, max_size=None)

    async def _handle(self, ws: ServerConnection) -> None:
        req = ws.request
        assert req is not None
        conn = WsConnection(path=req.path, headers=list(req.headers.raw_items()))
        with self._cond:
            self.connections.append(conn)
            self._cond.notify_all()
        try:
            for step in list(self.script):
                if step.after is not None:
                    while True:
                        msg = await ws.recv(decode=False)
                        conn.client_frames.append(msg)
                        if _type_of(msg) == step.after:
                            break
                for frame in step.frames:
                    await ws.send(frame.decode())
                    conn.sent += 1
            # Script done: keep reading until the client closes (records late client frames).
            async for msg in ws:
                conn.client_frames.append(msg.encode() if isinstance(msg, str) else msg)
        except Exception as e:  # noqa: BLE001 - a closed client ends the script
            conn.error = f"{type(e).__name__}: {e}"
        finally:
            conn.finished.set()


def _type_of(frame: Any) -> str | None:
    try:
        obj = json.loads(frame)
    except (ValueError, TypeError):
        return None
    return obj.get("type") if isinstance(obj, dict) else None
