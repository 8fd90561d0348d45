"""The addon's hooks driven directly with mitmproxy's own test flows: fail-open behaviour
that a real process cannot be made to show on demand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import tflow, tutils

from podtally.pricing import PriceBook
from podtally.providers.registry import HostTable
from podtally.sidecar.addon import MeterAddon
from podtally.usage import Identity, UsageRecord

DATA = Path(__file__).parent.parent / "providers" / "testdata"


class Harness:
    def __init__(self, **kw: Any) -> None:
        self.records: list[UsageRecord] = []
        self.faults: list[str] = []
        self.addon = MeterAddon(
            hosts=HostTable(), identity=Identity(namespace="ns", team="t"), prices=PriceBook(),
            sink=self.records.append, on_fault=self.faults.append, **kw,
        )

    def flow(self, body: bytes, path: str = "/v1/chat/completions", host: str = "api.openai.com") -> Any:
        req = tutils.treq(host=host, port=443, scheme=b"https", method=b"POST", path=path.encode(),
                          content=body, headers=((b"host", host.encode()),
                                                 (b"content-type", b"application/json")))
        f = tflow.tflow(req=req)
        f.client_conn.sni = host
        return f

    def run(self, f: Any, resp_headers: dict[str, str], chunks: list[bytes], *, error: bool = False) -> bytes:
        a = self.addon
        a.requestheaders(f)
        a.request(f)
        f.response = tutils.tresp(status_code=200, headers=tuple((k.encode(), v.encode()) for k, v in resp_headers.items()), content=b"")
        a.responseheaders(f)
        out = b""
        for c in [*chunks, b""]:
            got = f.response.stream(c)
            out += got if isinstance(got, bytes) else b"".join(got)
        if error:
            from mitmproxy.flow import Error
            f.error = Error("Client disconnected")
            a.error(f)
        else:
            a.response(f)
        return out


SSE = {"content-type": "text/event-stream"}


def test_parser_exception_passes_bytes_unaltered_and_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    stream = (DATA / "openai-chat-stream-usage.response.sse").read_bytes()
    f = h.flow(b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true}}')

    from podtally.providers import base

    def boom(self: Any, chunk: bytes) -> None:
        raise RuntimeError("sk-secret-in-message")

    monkeypatch.setattr(base.ResponseParser, "feed", boom)
    out = h.run(f, SSE, [stream[:100], stream[100:]])
    assert out == stream
    assert h.faults == ["parse"]
    (rec,) = h.records
    assert rec.status == "200" and rec.tokens is None


def test_stripper_exception_falls_back_to_the_original_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    stream = (DATA / "openai-chat-stream-usage.response.sse").read_bytes()
    f = h.flow(b'{"model":"gpt-4o-mini","stream":true}')
    from podtally.providers import include_usage

    calls = {"n": 0}
    real = include_usage.UsageChunkStripper.feed

    def flaky(self: Any, chunk: bytes) -> bytes:
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError("boom")
        return real(self, chunk)

    monkeypatch.setattr(include_usage.UsageChunkStripper, "feed", flaky)
    chunks = [stream[i : i + 300] for i in range(0, len(stream), 300)]
    out = h.run(f, SSE, chunks)
    assert h.faults == ["strip"]
    # Nothing lost or duplicated: what was rewritten before the fault, then the raw rest.
    assert out.endswith(b"data: [DONE]\n\n")
    assert out.count(b'"finish_reason":"stop"') == 1
    (rec,) = h.records
    assert rec.tokens is not None and rec.tokens.output == 9


def test_sink_fault_is_contained() -> None:
    h = Harness()

    def broken_sink(rec: UsageRecord) -> None:
        raise OSError("stdout closed")

    h.addon.sink = broken_sink
    f = h.flow(b'{"model":"gpt-4o"}')
    body = (DATA / "openai-chat.response.json").read_bytes()
    assert h.run(f, {"content-type": "application/json"}, [body]) == body
    assert h.faults == ["record"]
    assert h.addon.in_flight == 0


def test_fault_log_never_carries_the_message(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    from podtally.providers import base

    def boom(self: Any, chunk: bytes) -> None:
        raise RuntimeError("Bearer sk-live-TOPSECRET")

    monkeypatch.setattr(base.ResponseParser, "feed", boom)
    for _ in range(3):
        h.run(h.flow(b'{"model":"gpt-4o"}'), {"content-type": "application/json"}, [b"{}"])
    assert h.faults == ["parse"] * 3
    logged = [r for r in caplog.records if r.name == "podtally.sidecar"]
    assert len(logged) == 1  # logged once per kind
    assert "TOPSECRET" not in caplog.text


def test_gzip_response_is_metered_from_a_decoded_copy() -> None:
    import gzip

    h = Harness()
    body = (DATA / "openai-chat.response.json").read_bytes()
    packed = gzip.compress(body)
    f = h.flow(b'{"model":"gpt-4o"}')
    out = h.run(f, {"content-type": "application/json", "content-encoding": "gzip"},
                [packed[:10], packed[10:]])
    assert out == packed
    (rec,) = h.records
    assert rec.tokens is not None and rec.tokens.total == 0 + rec.tokens.input + rec.tokens.output


def test_unknown_content_encoding_counts_without_usage() -> None:
    h = Harness()
    f = h.flow(b'{"model":"gpt-4o"}')
    out = h.run(f, {"content-type": "application/json", "content-encoding": "snappy"}, [b"xx"])
    assert out == b"xx"
    (rec,) = h.records
    assert rec.tokens is None and rec.error == "unsupported content-encoding"


def test_client_disconnect_is_recorded() -> None:
    h = Harness()
    stream = (DATA / "anthropic-cache-read-stream.response.sse").read_bytes()
    f = h.flow(b'{"model":"claude","stream":true}', path="/v1/messages", host="api.anthropic.com")
    h.run(f, SSE, [stream[:600]], error=True)
    (rec,) = h.records
    assert rec.error == "client disconnected" and rec.provider == "anthropic"
    assert rec.tokens is not None and rec.tokens.cache_read == 1165
