"""The fake HTTPS provider, driven by the official SDKs over real TLS on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import anthropic
import httpx
import openai
import pytest
from support.fake_provider import (
    Chunk,
    Exchange,
    FakeProvider,
    ProviderTLS,
    Route,
    Script,
    WaitFor,
    load_routes,
    make_provider_tls,
    provider_command,
    read_request_log,
    split_sse,
    wait_ready,
)

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"

CHAT_RESPONSE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Paris.", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
}


def _chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> bytes:
    obj = {
        "id": "chatcmpl-2",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        "usage": usage,
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


STREAM_EVENTS = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Hel"}),
    _chunk({"content": "lo"}),
    _chunk({}, finish="stop"),
    b"data: "
    + json.dumps(
        {
            "id": "chatcmpl-2",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [],
            "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
        }
    ).encode()
    + b"\n\n",
    b"data: [DONE]\n\n",
]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> ProviderTLS:
    return make_provider_tls(tmp_path_factory.mktemp("provider-tls"))


def _openai(fp: FakeProvider, tls: ProviderTLS, **kw: Any) -> openai.OpenAI:
    # "localhost" is in the cert's SAN and exercises SNI; 127.0.0.1 is there too.
    return openai.OpenAI(
        base_url=f"https://localhost:{fp.port}/v1",
        api_key="sk-test",
        max_retries=0,
        http_client=httpx.Client(verify=tls.client_context(), timeout=10),
        **kw,
    )


def _ask(client: openai.OpenAI, **kw: Any) -> Any:
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Capital of France?"}], **kw
    )


@pytest.fixture
def fp(tls: ProviderTLS) -> Iterator[FakeProvider]:
    with FakeProvider(cert=tls.cert, key=tls.key) as server:
        yield server


# --- SDK happy paths ----------------------------------------------------------------------


def test_openai_non_stream_chat(fp: FakeProvider, tls: ProviderTLS) -> None:
    fp.set_route("POST", CHAT, Script.json(CHAT_RESPONSE, headers=[("x-request-id", "req_1")]))
    client = _openai(fp, tls)
    resp = _ask(client)
    assert resp.choices[0].message.content == "Paris."
    assert resp.usage is not None and resp.usage.total_tokens == 15

    (ex,) = fp.requests
    assert (ex.method, ex.path) == ("POST", CHAT)
    assert ex.json()["model"] == MODEL
    assert ex.json()["messages"] == [{"role": "user", "content": "Capital of France?"}]
    assert ex.header("Authorization") == "Bearer sk-test"
    assert ex.header("content-type") == "application/json"
    assert ex.sni == "localhost"
    assert ex.alpn == "http/1.1"
    assert ex.tls_version in ("TLSv1.2", "TLSv1.3")
    assert fp.wait_for_outcome(0).outcome == "complete"
    assert ex.status == 200 and len(ex.sent_chunks_at) == 1


def test_openai_stream_chunks_reach_client_while_provider_still_streaming(
    fp: FakeProvider, tls: ProviderTLS
) -> None:
    release = threading.Event()
    fp.set_route(
        "POST",
        CHAT,
        Script.sse([*STREAM_EVENTS[:2], WaitFor(event=release), *STREAM_EVENTS[2:]], delay=0.01),
    )
    client = _openai(fp, tls)
    stream = _ask(client, stream=True, stream_options={"include_usage": True})
    it = iter(stream)
    first = next(it)
    second = next(it)
    got_second_at = time.monotonic()
    assert first.choices[0].delta.role == "assistant"
    assert second.choices[0].delta.content == "Hel"

    # The provider is parked on the WaitFor: only two chunks have left it.
    ex = fp.wait_for_requests(1)[0]
    assert ex.outcome == "pending" and len(ex.sent_chunks_at) == 2
    assert ex.json()["stream"] is True
    assert ex.json()["stream_options"] == {"include_usage": True}

    release.set()
    rest = list(it)
    text = "".join(c.choices[0].delta.content or "" for c in [first, second, *rest] if c.choices)
    assert text == "Hello"
    assert rest[-1].usage is not None and rest[-1].usage.total_tokens == 9

    ex = fp.wait_for_outcome(0)
    assert ex.outcome == "complete"
    assert len(ex.sent_chunks_at) == len(STREAM_EVENTS)
    assert ex.sent_chunks_at[1] < got_second_at < ex.sent_chunks_at[2]
    assert ex.header("accept") == "application/json"  # the SDK's default, even for streams


def test_anthropic_stream(fp: FakeProvider, tls: ProviderTLS) -> None:
    def ev(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

    msg: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 11, "output_tokens": 1},
    }
    transcript = b"".join(
        [
            ev("message_start", {"type": "message_start", "message": msg}),
            ev(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            ev(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": "Hi"},
                },
            ),
            ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ev(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 5},
                },
            ),
            ev("message_stop", {"type": "message_stop"}),
        ]
    )
    events = split_sse(transcript)
    assert len(events) == 6
    fp.set_route("POST", "/v1/messages", Script.sse(events))
    client = anthropic.Anthropic(
        base_url=f"https://localhost:{fp.port}",
        api_key="sk-ant-test",
        max_retries=0,
        http_client=httpx.Client(verify=tls.client_context(), timeout=10),
    )
    with client.messages.stream(
        model="claude-sonnet-4-5-20250929",
        max_tokens=16,
        messages=[{"role": "user", "content": "hi"}],
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == "Hi"
    assert final.usage.input_tokens == 11 and final.usage.output_tokens == 5
    (ex,) = fp.requests
    assert ex.header("x-api-key") == "sk-ant-test"
    assert ex.json()["stream"] is True


def test_keep_alive_two_requests_share_one_connection(fp: FakeProvider, tls: ProviderTLS) -> None:
    fp.set_route("POST", CHAT, Script.json(CHAT_RESPONSE))
    client = _openai(fp, tls)
    _ask(client)
    _ask(client, stream=False)
    fp.set_route("POST", CHAT, Script.sse(STREAM_EVENTS))
    assert len(list(_ask(client, stream=True))) == len(STREAM_EVENTS) - 1  # [DONE] is no chunk
    a, b, c = fp.wait_for_requests(3)
    assert a.conn_id == b.conn_id == c.conn_id
    assert [a.seq_on_conn, b.seq_on_conn, c.seq_on_conn] == [0, 1, 2]
    assert fp.connection_count == 1


def test_keep_alive_false_closes_connection(fp: FakeProvider, tls: ProviderTLS) -> None:
    fp.set_route("POST", CHAT, Script.json(CHAT_RESPONSE, keep_alive=False))
    client = _openai(fp, tls)
    _ask(client)
    _ask(client)
    a, b = fp.wait_for_requests(2)
    assert a.conn_id != b.conn_id
    assert fp.connection_count == 2


def test_alpn_is_http11_even_when_client_offers_h2(fp: FakeProvider, tls: ProviderTLS) -> None:
    fp.set_route("GET", "/v1/models", Script.json({"data": []}))
    ctx = ssl.create_default_context(cafile=str(tls.ca_cert))
    with httpx.Client(http2=True, verify=ctx) as c:
        r = c.get(f"https://localhost:{fp.port}/v1/models")
    assert r.http_version == "HTTP/1.1" and r.json() == {"data": []}
    assert fp.requests[0].alpn == "http/1.1"


# --- faults -------------------------------------------------------------------------------


@pytest.mark.parametrize("close_mode", ["close", "reset"])
def test_truncated_stream_raises_in_client(
    fp: FakeProvider, tls: ProviderTLS, close_mode: Literal["close", "reset"]
) -> None:
    fp.set_route("POST", CHAT, Script.sse(STREAM_EVENTS, close_after=2, close_mode=close_mode))
    client = _openai(fp, tls)
    got: list[Any] = []
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError, openai.APIConnectionError)):
        for chunk in _ask(client, stream=True):
            got.append(chunk)
    assert len(got) == 2
    ex = fp.wait_for_outcome(0)
    assert ex.outcome == "closed_early" and len(ex.sent_chunks_at) == 2


def test_truncated_content_length_body(fp: FakeProvider, tls: ProviderTLS) -> None:
    body = json.dumps(CHAT_RESPONSE).encode()
    fp.set_route(
        "POST",
        CHAT,
        Script(
            headers=[("content-type", "application/json")],
            body=[body[:40], (body[40:], 0.01)],
            close_after=1,
        ),
    )
    with httpx.Client(verify=tls.client_context()) as c, pytest.raises(httpx.RemoteProtocolError):
        c.post(f"https://localhost:{fp.port}{CHAT}", json={})
    assert fp.wait_for_outcome(0).outcome == "closed_early"


def test_paced_content_length_body_and_malformed_bytes(fp: FakeProvider, tls: ProviderTLS) -> None:
    fp.set_route(
        "POST",
        CHAT,
        Script(
            headers=[("content-type", "application/json")],
            body=[Chunk(b'{"id": "x", '), Chunk(b'"broken', delay=0.02)],
        ),
    )
    with httpx.Client(verify=tls.client_context()) as c:
        r = c.post(f"https://localhost:{fp.port}{CHAT}", json={})
    assert r.headers["content-length"] == str(len(b'{"id": "x", "broken'))
    assert "transfer-encoding" not in r.headers
    assert r.content == b'{"id": "x", "broken'
    ex = fp.wait_for_outcome(0)
    assert ex.sent_chunks_at[1] - ex.sent_chunks_at[0] >= 0.015


def test_raw_response_and_wait_timeout(fp: FakeProvider, tls: ProviderTLS) -> None:
    fp.set_route("GET", "/raw", Script(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"))
    fp.set_route(
        "GET", "/stuck", Script.sse([b"data: 1\n\n", WaitFor(event=threading.Event(), timeout=0.2)])
    )
    with httpx.Client(verify=tls.client_context()) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            c.get(f"https://localhost:{fp.port}/raw")
        with pytest.raises(httpx.RemoteProtocolError):
            c.get(f"https://localhost:{fp.port}/stuck")
    assert fp.wait_for_outcome(0).outcome == "raw"
    assert fp.wait_for_outcome(1).outcome == "wait_timeout"


# --- routing ------------------------------------------------------------------------------


def test_routing_sequence_callable_default_and_query(tls: ProviderTLS) -> None:
    def echo(ex: Exchange) -> Script:
        return Script.json({"echo": ex.json(), "path": ex.path})

    routes: dict[tuple[str, str], Route] = {
        ("POST", "/retry"): [Script.json({"n": 1}, status=500), Script.json({"n": 2})],
        ("POST", "/echo"): echo,
    }
    with (
        FakeProvider(routes, cert=tls.cert, key=tls.key) as fp,
        httpx.Client(verify=tls.client_context(), base_url=fp.url) as c,
    ):
        assert [c.post("/retry").status_code for _ in range(3)] == [500, 200, 200]
        assert c.post("/echo?api-version=1", json={"a": 1}).json() == {
            "echo": {"a": 1},
            "path": "/echo?api-version=1",
        }
        r = c.get("/nope")
        assert r.status_code == 404 and "no route" in r.text
    assert fp.url.startswith("https://127.0.0.1:")


def test_in_process_request_log_jsonl(tls: ProviderTLS, tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    routes = {("POST", CHAT): Script.json(CHAT_RESPONSE)}
    with FakeProvider(routes, cert=tls.cert, key=tls.key, log_path=log) as fp:
        _ask(_openai(fp, tls))
        _ask(_openai(fp, tls), stream=False)
        fp.wait_for_outcome(1)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["event"] for r in lines] == ["request", "response", "request", "response"]
    exs = read_request_log(log)
    assert [e.id for e in exs] == [0, 1]
    assert all(e.outcome == "complete" and e.status == 200 for e in exs)
    assert exs[0].json()["model"] == MODEL
    assert exs[0].header("authorization") == "Bearer sk-test"
    assert exs[0].body == fp.requests[0].body
    assert exs[0].sni == "localhost"


# --- subprocess mode ----------------------------------------------------------------------


def test_subprocess_with_json_routes_and_wait_for_file(tls: ProviderTLS, tmp_path: Path) -> None:
    release = tmp_path / "release"
    (tmp_path / "stream.sse").write_bytes(b"".join(STREAM_EVENTS[2:]))
    spec = {
        "routes": [
            {
                "method": "POST",
                "path": CHAT,
                "status": 200,
                "headers": [["content-type", "text/event-stream"]],
                "chunked": True,
                "body": [
                    {"data": STREAM_EVENTS[0].decode()},
                    {"data_b64": __import__("base64").b64encode(STREAM_EVENTS[1]).decode()},
                    {"wait_for_file": str(release), "timeout": 20},
                    {"file": "stream.sse", "split_sse": True, "delay": 0.005},
                ],
            },
            {"method": "GET", "path": "/v1/models", "json": {"object": "list", "data": []}},
            {"method": "GET", "path": "/flaky", "sequence": [{"status": 503}, {"status": 204}]},
        ],
        "default": {"status": 418, "body": "teapot"},
    }
    routes_file = tmp_path / "routes.json"
    routes_file.write_text(json.dumps(spec))
    routes, default = load_routes(routes_file)
    assert default is not None and default.status == 418
    script = routes[("POST", CHAT)]
    assert isinstance(script, Script)
    assert [type(p).__name__ for p in script.parts()] == ["Chunk"] * 2 + ["WaitFor"] + ["Chunk"] * 4

    log, ready = tmp_path / "log.jsonl", tmp_path / "ready.json"
    argv = provider_command(
        routes_file, cert=tls.cert, key=tls.key, listen=["127.0.0.1:0"], log=log, ready_file=ready
    )
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        info = wait_ready(ready, proc)
        assert info["pid"] == proc.pid
        port = info["listening"][0][1]
        client = httpx.Client(verify=tls.client_context(), base_url=f"https://localhost:{port}")
        assert client.get("/v1/models").json() == {"object": "list", "data": []}
        assert [client.get("/flaky").status_code for _ in range(2)] == [503, 204]
        assert client.get("/x").status_code == 418

        with client.stream("POST", CHAT, json={"model": MODEL, "stream": True}) as r:
            assert r.headers["transfer-encoding"] == "chunked"
            lines = r.iter_lines()
            received = []
            for line in lines:
                if line:
                    received.append(line)
                if len(received) == 2:  # what precedes the wait_for_file
                    break
            # Held: the log shows the request but not its end.
            deadline = time.monotonic() + 5
            while not [e for e in read_request_log(log) if e.path == CHAT]:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            (ex,) = [e for e in read_request_log(log) if e.path == CHAT]
            assert ex.outcome == "pending" and ex.json() == {"model": MODEL, "stream": True}
            release.touch()
            received += [line for line in lines if line]
        assert received[-1] == "data: [DONE]"
        assert len(received) == len(STREAM_EVENTS)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()
    assert b"fake provider listening" in out
    (ex,) = [e for e in read_request_log(log) if e.path == CHAT]
    assert ex.outcome == "complete" and len(ex.sent_chunks_at) == len(STREAM_EVENTS)
    assert [e.status for e in read_request_log(log)] == [200, 503, 204, 418, 200]


def test_client_disconnect_mid_stream_is_recorded(fp: FakeProvider, tls: ProviderTLS) -> None:
    fp.set_route("POST", CHAT, Script.sse([*STREAM_EVENTS[:2], *STREAM_EVENTS[2:]], delay=0.05))
    client = _openai(fp, tls)
    stream = _ask(client, stream=True)
    next(iter(stream))
    stream.close()  # the client goes away while the provider is still streaming
    ex = fp.wait_for_outcome(0)
    assert ex.outcome == "client_gone"
    assert 1 <= len(ex.sent_chunks_at) < len(STREAM_EVENTS)


def test_ipv6_and_plain_http(tls: ProviderTLS) -> None:
    routes = {("GET", "/ping"): Script.json({"ok": True})}
    with FakeProvider(routes, cert=tls.cert, key=tls.key, listen="[::1]:0") as fp6:
        assert fp6.url.startswith("https://[::1]:")
        with httpx.Client(verify=tls.client_context()) as c:
            assert c.get(f"{fp6.url}/ping").json() == {"ok": True}
        assert fp6.requests[0].sni is None  # no SNI for IP literals
    with FakeProvider(routes) as plain, httpx.Client() as c:
        assert plain.url.startswith("http://127.0.0.1:")
        assert c.get(f"{plain.url}/ping").json() == {"ok": True}
        assert plain.requests[0].alpn is None


def test_routes_file_rejects_typos(tmp_path: Path) -> None:
    f = tmp_path / "routes.json"
    f.write_text(json.dumps({"routes": [{"path": "/x", "chunkd": True}]}))
    with pytest.raises(ValueError, match="chunkd"):
        load_routes(f)
    f.write_text(json.dumps({"routes": [{"path": "/x", "body": [{"dat": "x"}]}]}))
    with pytest.raises(ValueError, match="dat"):
        load_routes(f)
