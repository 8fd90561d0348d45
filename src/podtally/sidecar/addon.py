"""The mitmproxy addon: the only module that touches mitmproxy's flow objects.

Per call: `request` recognises a metered LLM call (and may ask an OpenAI chat stream for
usage), `responseheaders` streams the response through a parser chunk by chunk, and
`response`/`error` turn what the parser learned into one UsageRecord. Every hook is
guarded: a metering fault is counted and logged once, and the bytes go on unaltered.
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mitmproxy import http, tls
from mitmproxy.addons.next_layer import NeedsMoreData, NextLayer
from mitmproxy.proxy import layer, layers, mode_specs
from mitmproxy.proxy.context import Context

from podtally.calls import MeteredCall, request_id
from podtally.pricing import PriceBook
from podtally.providers.decoding import decoder_for
from podtally.providers.include_usage import UsageChunkStripper, add_include_usage
from podtally.providers.realtime import RealtimeSession
from podtally.providers.registry import (
    HostTable,
    detect,
    operation_for,
    provider_for_plain_http,
)
from podtally.records import CallFacts, build_record
from podtally.usage import Identity, UsageRecord

log = logging.getLogger("podtally.sidecar")

METADATA_KEY = "podtally"
REALTIME_KEY = "podtally.realtime"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Call(MeteredCall):
    """One metered call in flight (podtally.calls), plus what only a proxy does: strip the
    usage chunk it asked for."""

    stripper: UsageChunkStripper | None = None
    done: bool = False


class PodtallyNextLayer(NextLayer):
    """mitmproxy's layer choice, with one rule first: in transparent mode, a plain-TCP
    connection is only parsed as HTTP when it is an LLM call (an LLM host, or an LLM API
    path on any host); everything else is relayed as raw TCP, untouched. TLS connections
    are decided at ClientHello by `MeterAddon.tls_clienthello`."""

    def __init__(self, hosts: HostTable) -> None:
        super().__init__()
        self.hosts = hosts

    def _next_layer(
        self, context: Context, data_client: bytes, data_server: bytes
    ) -> layer.Layer | None:
        if (
            len(context.layers) == 1
            and isinstance(context.client.proxy_mode, mode_specs.TransparentMode)
            and context.client.transport_protocol == "tcp"
            and not _starts_like_tls(data_client)
            and not data_server
            and not self._plain_http_llm(data_client)
        ):
            return layers.TCPLayer(context, ignore=True)
        return super()._next_layer(context, data_client, data_server)

    def _plain_http_llm(self, data: bytes) -> bool:
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0:
            if len(data) < 16 * 1024 and (not data or data[:1].isalpha()):
                raise NeedsMoreData
            return False
        request_line, _, headers = data[:head_end].partition(b"\r\n")
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return False
        host = ""
        for line in headers.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"host":
                host = value.strip().decode("latin-1").rsplit(":", 1)[0]
        path = parts[1].decode("latin-1")
        provider = self.hosts.provider_for(host) or provider_for_plain_http(host, None, path)
        return operation_for(provider, path, parts[0].decode("latin-1")) is not None


def _starts_like_tls(data: bytes) -> bool:
    return len(data) >= 3 and data[0] == 0x16 and data[1] == 0x03


class MeterAddon:
    def __init__(
        self,
        *,
        hosts: HostTable,
        identity: Identity,
        prices: PriceBook,
        sink: Callable[[UsageRecord], None],
        on_fault: Callable[[str], None],
        inject_stream_usage: bool = True,
    ) -> None:
        self.hosts = hosts
        self.identity = identity
        self.prices = prices
        self.sink = sink
        self.on_fault = on_fault
        self.inject_stream_usage = inject_stream_usage
        self.in_flight = 0
        self.ready = False
        self._logged: set[tuple[str, str]] = set()

    # -- guard ---------------------------------------------------------------------------

    def _fault(self, stage: str, exc: BaseException) -> None:
        self.on_fault(stage)
        key = (stage, type(exc).__name__)
        if key in self._logged:
            return
        self._logged.add(key)
        # The exception's message may quote traffic; only its type and frames are logged.
        frames = " <- ".join(
            f"{Path(fr.filename).name}:{fr.lineno} {fr.name}"
            for fr in reversed(traceback.extract_tb(exc.__traceback__, limit=-4))
        )
        log.error("metering fault in %s: %s at %s (traffic unaffected; logged once)",
                  stage, type(exc).__name__, frames)

    @staticmethod
    def _guarded(stage: str) -> Callable[[F], F]:
        def wrap(fn: F) -> F:
            @functools.wraps(fn)
            def hook(self: MeterAddon, *args: Any) -> None:
                try:
                    fn(self, *args)
                except Exception as exc:  # noqa: BLE001 - the boundary: never into the proxy
                    self._fault(stage, exc)
            return hook  # type: ignore[return-value]
        return wrap

    # -- hooks -----------------------------------------------------------------------------

    def running(self) -> None:
        self.ready = True

    @_guarded("tls_clienthello")
    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        # By SNI; without one (an IP literal), by the destination: the CONNECT target in
        # regular mode, the original destination address in transparent mode.
        server = data.context.server.address
        target = data.client_hello.sni or (str(server[0]) if server else None)
        if self.hosts.provider_for(target) is None:
            data.ignore_connection = True  # not an LLM endpoint: relayed, never decrypted

    @_guarded("tls_start_client")
    def tls_start_client(self, data: tls.TlsData) -> None:
        """Offer the app HTTP/2 whenever it can speak it. mitmproxy follows the client's
        ALPN order, and httpx lists http/1.1 first; LLM providers answer h2 to whoever
        offers it, so the app gets from the sidecar what it would get from the provider."""
        conn = data.ssl_conn
        if conn is None or b"h2" not in (data.context.client.alpn_offers or ()):
            return
        app_data = conn.get_app_data()
        if (isinstance(app_data, dict) and app_data.get("http2")
                and app_data.get("client_alpn") is None and app_data.get("server_alpn") is None):
            app_data["client_alpn"] = b"h2"

    @_guarded("requestheaders")
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        provider = self._provider(flow)
        req = flow.request
        if provider is None or operation_for(provider, req.path, req.method) is None:
            flow.request.stream = True  # not a metered call: never buffered

    @_guarded("request")
    def request(self, flow: http.HTTPFlow) -> None:
        provider = self._provider(flow)
        if provider is None or flow.request.stream:
            return
        req = flow.request
        body = req.raw_content or b""
        encoded = "content-encoding" in req.headers
        spec = detect(provider, req.method, req.path, b"" if encoded else body)
        if spec is None:
            return
        call = Call(spec=spec, host=self._host(flow) or "", started=req.timestamp_start)
        if spec.usage_opt_in_missing and self.inject_stream_usage and not encoded:
            new_body = add_include_usage(body)
            if new_body is not None:
                req.raw_content = new_body
                req.headers["content-length"] = str(len(new_body))
                # The extra usage chunk is removed from the SSE text; that needs it plain.
                req.headers.pop("accept-encoding", None)
                call.usage_injected = True
        flow.metadata[METADATA_KEY] = call
        self.in_flight += 1

    @_guarded("responseheaders")
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        resp = flow.response
        assert resp is not None
        if call is None:
            resp.stream = True
            return
        headers = {k.lower(): v for k, v in resp.headers.items()}  # type: ignore[no-untyped-call]
        call.open_response(headers)
        # The stripper edits SSE text: a body encoded anyway (Accept-Encoding was dropped)
        # passes as sent, unbuffered.
        if call.usage_injected and call.parser.streaming and call.decode is decoder_for(""):
            call.stripper = UsageChunkStripper()
        resp.stream = functools.partial(self._on_chunk, call)

    def _on_chunk(self, call: Call, data: bytes) -> bytes | list[bytes]:
        """Called by mitmproxy for every response chunk, and with b"" at the end."""
        out = data
        if call.metering:
            try:
                call.feed(data, time.time())
            except Exception as exc:  # noqa: BLE001
                call.stop_metering()
                self._fault("parse", exc)
        if call.stripper is not None:
            try:
                out = call.stripper.feed(data) if data else call.stripper.flush()
            except Exception as exc:  # noqa: BLE001
                held, call.stripper = call.stripper.flush(), None
                self._fault("strip", exc)
                out = held + data
        # An empty chunk would be sent as HTTP/1.1's terminating zero-length chunk.
        return out if out else []

    @_guarded("response")
    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow, complete=True)

    @_guarded("error")
    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow, complete=False)

    # -- helpers ---------------------------------------------------------------------------

    def _host(self, flow: http.HTTPFlow) -> str | None:
        host: str | None = flow.client_conn.sni or flow.request.host_header or flow.request.host
        return host

    def _provider(self, flow: http.HTTPFlow) -> str | None:
        host = self._host(flow)
        if host:
            host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        provider = self.hosts.provider_for(host)
        if provider is None and flow.request.scheme == "http":
            provider = provider_for_plain_http(host or "", flow.request.port, flow.request.path)
        return provider

    def _finish(self, flow: http.HTTPFlow, *, complete: bool) -> None:
        call: Call | None = flow.metadata.get(METADATA_KEY)
        if call is None or call.done:
            return
        call.done = True
        self.in_flight -= 1
        try:
            for facts in self._facts(flow, call, complete=complete):
                self.sink(build_record(self.identity, self.prices, facts))
        except Exception as exc:  # noqa: BLE001
            self._fault("record", exc)

    def _facts(self, flow: http.HTTPFlow, call: Call, *, complete: bool) -> list[CallFacts]:
        resp = flow.response
        failure = flow.error.msg if flow.error is not None else None
        by_client = failure is not None and failure.startswith("Client")
        if by_client and call.ended:
            # SDKs close the connection as soon as they read the stream's end marker,
            # often before the body's last bytes: the call was complete.
            failure, complete = None, True
        if failure is not None:
            failure = "client disconnected" if by_client else "upstream error"
        headers = (
            {k.lower(): v for k, v in resp.headers.items()}  # type: ignore[no-untyped-call]
            if resp is not None else None
        )
        return call.facts(
            status=str(resp.status_code) if resp is not None else "error",
            ended=time.time(), complete=complete, failure=failure,
            request_id=request_id(headers),
        )

    # -- OpenAI Realtime over WebSocket -----------------------------------------------------

    @_guarded("websocket_start")
    def websocket_start(self, flow: http.HTTPFlow) -> None:
        provider = self._provider(flow)
        path = flow.request.path.split("?", 1)[0]
        if provider not in ("openai", "azure.ai.openai") or not path.endswith("/realtime"):
            return
        model = flow.request.query.get("model") or flow.request.query.get("deployment")
        flow.metadata[REALTIME_KEY] = RealtimeSession(model)

    @_guarded("websocket_message")
    def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        messages = flow.websocket.messages
        session: RealtimeSession | None = flow.metadata.get(REALTIME_KEY)
        message = messages[-1]
        # The sidecar keeps no history: a realtime session can run for hours of audio.
        messages.clear()
        if session is None or message.from_client:
            return
        now = time.time()
        done = session.on_server_message(message.content, now)
        if done is None:
            return
        facts = CallFacts(
            provider=self._provider(flow) or "openai",
            host=self._host(flow) or "",
            operation="realtime",
            request_model=session.model,
            streamed=True,
            status="error" if done.status == "failed" else "200",
            usage=done.usage,
            started=done.started_at or now,
            ended=now,
        )
        self.sink(build_record(self.identity, self.prices, facts))
