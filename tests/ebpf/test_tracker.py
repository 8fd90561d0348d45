"""The pure half of the agent: HTTP/1.1 reassembly and metering from synthetic SSL events,
fed whole, in 7-byte slices and byte by byte, with the recorded payloads the sidecar's
golden tests use."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from support.ebpf_agent import DATA, expected
from support.fake_provider import split_sse

from podtally.ebpf import http1
from podtally.ebpf.events import (
    CLOSE,
    CONNECT,
    DATA_HEADER_SIZE,
    READ,
    TRUNC,
    WRITE,
    ConnectEvent,
    DataEvent,
    Task,
    decode,
)
from podtally.ebpf.tracker import Tracker
from podtally.providers.registry import HostTable
from podtally.records import CallFacts

TASK = Task(pid=42, uid=1000, cgroup=7, comm="python3")
SPLITS = {"whole": 1 << 30, "7-bytes": 7, "1-byte": 1}


def request(path: str, body: bytes, host: str = "api.openai.com") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def response(body: bytes, ctype: str = "application/json", status: int = 200,
             extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status} OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"x-request-id: req_1\r\n{extra}\r\n").encode() + body


def chunked(events: list[bytes], ctype: str = "text/event-stream") -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head.encode() + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


def slices(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


class Feed:
    def __init__(self, hosts: HostTable | None = None) -> None:
        self.facts: list[CallFacts] = []
        self.faults: list[str] = []
        self.ignored: list[tuple[int, int]] = []
        self.ts = 1_000_000_000
        self.tracker = Tracker(hosts or HostTable(), lambda t, f: self.facts.append(f),
                               self.faults.append, epoch_of=lambda ns: ns / 1e9,
                               on_ignore=lambda pid, conn: self.ignored.append((pid, conn)))

    def send(self, kind: int, data: bytes, size: int = 1 << 30, conn: int = 0xABC) -> None:
        for piece in slices(data, size):
            self.ts += 1000
            self.tracker.on_event(DataEvent(kind, TASK, conn, self.ts, 0, len(piece), piece))

    def close(self, conn: int = 0xABC) -> None:
        self.ts += 1000
        self.tracker.on_event(DataEvent(CLOSE, TASK, conn, self.ts, 0, 0, b""))


@pytest.mark.parametrize("size", SPLITS.values(), ids=SPLITS.keys())
def test_json_and_sse_calls_on_one_keep_alive_connection(size: int) -> None:
    f = Feed()
    chat_req = (DATA / "openai-chat.request.json").read_bytes()
    stream_req = (DATA / "openai-chat-stream-usage.request.json").read_bytes()
    f.send(WRITE, request("/v1/chat/completions", chat_req), size)
    f.send(READ, response((DATA / "openai-chat.response.json").read_bytes()), size)
    f.send(WRITE, request("/v1/chat/completions", stream_req), size)
    f.send(READ, chunked(split_sse((DATA / "openai-chat-stream-usage.response.sse")
                                   .read_bytes())), size)
    f.close()
    assert [x.usage.tokens.as_dict() for x in f.facts if x.usage and x.usage.tokens] == [
        expected("openai-chat")["tokens"], expected("openai-chat-stream-usage")["tokens"]]
    assert [(x.status, x.streamed, x.error, x.request_id) for x in f.facts] == [
        ("200", False, None, "req_1"), ("200", True, None, None)]
    assert f.facts[1].first_token_at is not None and f.faults == []
    assert len(f.tracker) == 0


def test_pipelined_requests_are_answered_in_order() -> None:
    f = Feed()
    body = (DATA / "anthropic-messages.request.json").read_bytes()
    f.send(WRITE, request("/v1/messages", body, "api.anthropic.com") * 2)
    answer = response((DATA / "anthropic-messages.response.json").read_bytes())
    f.send(READ, answer * 2)
    assert len(f.facts) == 2
    assert all(x.usage and x.usage.tokens and x.usage.tokens.as_dict()
               == expected("anthropic-messages")["tokens"] for x in f.facts)


def test_only_llm_hosts_and_metered_paths_become_calls() -> None:
    f = Feed(HostTable([("llm.internal", "openai_compatible")]))
    f.send(WRITE, request("/v1/chat/completions", b"{}", "example.com"))  # not an LLM host
    f.send(READ, response(b"{}"))
    f.send(WRITE, b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n", conn=2)
    f.send(READ, response(b'{"data": []}'), conn=2)
    f.send(WRITE, request("/v1/chat/completions", b'{"model":"m"}', "llm.internal"), conn=3)
    f.send(READ, response((DATA / "openai-chat.response.json").read_bytes()), conn=3)
    assert [(x.provider, x.host) for x in f.facts] == [("openai_compatible", "llm.internal")]


def test_connections_to_other_hosts_and_http2_are_ignored_in_the_kernel() -> None:
    f = Feed()
    f.send(WRITE, request("/upload", b"x" * 100, "example.com"))  # not an LLM host
    assert f.ignored == [(TASK.pid, 0xABC)] and len(f.tracker) == 0
    f.send(READ, response(b"{}"))  # queued before the kernel was told: dropped
    f.send(WRITE, b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n", conn=2)
    assert len(f.ignored) == 1 and len(f.tracker) == 1  # an LLM host: followed
    f.send(WRITE, http1.HTTP2_PREFACE + b"\r\nSM\r\n\r\n", conn=3)
    assert f.ignored[1:] == [(TASK.pid, 3)] and f.tracker.unparsed == {"http2": 1}
    f.send(WRITE, b"\x16\x03\x01garbage", conn=4)  # unknown: may yet start a request
    assert len(f.ignored) == 2
    # A call in flight on the connection keeps it followed (pipelining).
    f.send(WRITE, request("/v1/chat/completions", b'{"model": "gpt-4o"}'), conn=5)
    f.send(WRITE, request("/x", b"{}", "example.com"), conn=5)
    f.send(READ, response((DATA / "openai-chat.response.json").read_bytes()), conn=5)
    assert len(f.ignored) == 2 and len(f.facts) == 1 and f.facts[0].error is None


def test_a_stream_cut_by_ssl_free_is_an_error_after_its_end_marker_is_not() -> None:
    f = Feed()
    events = split_sse((DATA / "openai-chat-stream-usage.response.sse").read_bytes())
    req = request("/v1/chat/completions", (DATA / "openai-chat-stream-usage.request.json")
                  .read_bytes())
    whole = chunked(events)
    f.send(WRITE, req)
    f.send(READ, whole[:whole.index(events[2])])  # two events, then the connection is freed
    f.close()
    f.send(WRITE, req, conn=2)
    f.send(READ, whole[:-5], conn=2)  # everything but the terminating zero-length chunk
    f.close(conn=2)
    cut, done = f.facts
    assert cut.error == "connection closed before the response ended"
    assert cut.usage is not None and cut.usage.parse_error is not None
    assert done.error is None
    assert done.usage and done.usage.tokens and done.usage.tokens.as_dict() == expected(
        "openai-chat-stream-usage")["tokens"]


def test_joined_mid_way_the_next_request_is_picked_up() -> None:
    f = Feed()
    req = request("/v1/chat/completions", (DATA / "openai-chat.request.json").read_bytes())
    resp = response((DATA / "openai-chat.response.json").read_bytes())
    f.send(WRITE, req[40:])  # the agent started after this request's head went out
    f.send(READ, resp)
    f.send(WRITE, req)
    f.send(READ, resp)
    assert len(f.facts) == 1 and f.facts[0].error is None
    assert f.tracker.unparsed == {"unparsed": 1}


def test_truncated_plaintext_ends_calls_in_flight_and_http2_is_counted() -> None:
    f = Feed()
    f.send(WRITE, request("/v1/chat/completions", b'{"model": "gpt-4o"}'))
    f.tracker.on_event(DataEvent(TRUNC, TASK, 0xABC, 5, 131072, 200000, b""))
    assert [(x.status, x.error) for x in f.facts] == [
        ("error", "plaintext larger than the agent copies per call")]
    f.send(WRITE, http1.HTTP2_PREFACE + b"\r\nSM\r\n\r\n", conn=9)
    assert f.tracker.unparsed == {"http2": 1}


def test_connections_beyond_the_limit_are_dropped_oldest_first() -> None:
    f = Feed()
    f.tracker.max_connections = 3
    for conn in range(5):
        f.send(WRITE, request("/v1/chat/completions", b'{"model": "gpt-4o"}'), conn=conn)
    assert len(f.tracker) == 3 and f.tracker.evicted == 2
    assert [x.error for x in f.facts] == ["connection no longer tracked (agent limit)"] * 2
    assert f.tracker.expire(f.ts + 10**12, idle_seconds=1) == 3
    assert len(f.tracker) == 0 and len(f.facts) == 5


def test_kernel_records_decode() -> None:
    import struct

    head = struct.pack("<B3xIIIQQQIII16s", WRITE, 7, 8, 1000, 0xFEED, 123, 99, 3, 3, 0,
                       b"python3\0")
    assert len(head) == DATA_HEADER_SIZE
    ev = decode(head + b"abc")
    assert ev == DataEvent(WRITE, Task(7, 1000, 99, "python3"), 0xFEED, 123, 0, 3, b"abc")
    addr = bytes([198, 18, 0, 2]) + bytes(12)
    conn = struct.pack("<BBHIIIQQQ16s16s", CONNECT, 4, 443, 7, 8, 1337, 1, 5, 99, addr,
                       b"curl\0")
    assert decode(conn) == ConnectEvent(Task(7, 1337, 99, "curl"), 5, "198.18.0.2", 443)
    six = struct.pack("<BBHIIIQQQ16s16s", CONNECT, 6, 443, 7, 8, 0, 1, 5, 99,
                      bytes.fromhex("20010002000000000000000000000002"), b"x\0")
    assert decode(six).address == "2001:2::2"  # type: ignore[union-attr]
    assert decode(b"") is None and decode(b"\x09" * 80) is None


def test_records_carry_no_content() -> None:
    f = Feed()
    f.send(WRITE, request("/v1/chat/completions", json.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "SECRET"}]}).encode()))
    f.send(READ, response((DATA / "openai-chat.response.json").read_bytes()))
    assert "SECRET" not in repr(f.facts)


@pytest.mark.parametrize("size", SPLITS.values(), ids=SPLITS.keys())
def test_http1_framing(size: int) -> None:
    """RFC 9112's cases, each split every way: HEAD, 204, 100 Continue, trailers, a body
    until close, and a request without a body."""
    obs = http1.Http1Observer()
    events: list[http1.Event] = []

    def client(data: bytes) -> None:
        for piece in slices(data, size):
            events.extend(obs.from_client(piece))

    def server(data: bytes) -> None:
        for piece in slices(data, size):
            events.extend(obs.from_server(piece))

    client(b"HEAD /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n"
           b"POST /c HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi"
           b"POST /d HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n")
    server(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"  # HEAD: no body despite it
           b"HTTP/1.1 204 No Content\r\n\r\n"
           b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
           b"HTTP/1.1 200 OK\r\n\r\nuntil close")
    events.extend(obs.close())
    heads = [(e.method, e.target) if isinstance(e, http1.RequestHead) else e.status
             for e in events if isinstance(e, http1.RequestHead | http1.ResponseHead)]
    assert heads == [("HEAD", "/a"), ("GET", "/b"), ("POST", "/c"), ("POST", "/d"),
                     200, 204, 201, 200]
    client_body = b"".join(e.data for e in events if isinstance(e, http1.Body) and e.from_client)
    server_body = b"".join(e.data for e in events if isinstance(e, http1.Body)
                           and not e.from_client)
    assert client_body == b"hiabc" and server_body == b"until close"
    assert sum(isinstance(e, http1.End) and e.from_client for e in events) == 4
    assert sum(isinstance(e, http1.End) and not e.from_client for e in events) == 4
    assert obs.broken is None


@pytest.mark.parametrize("bad", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
], ids=["chunk-size", "negative-length", "not-http", "header"])
def test_http1_garbage_breaks_the_stream(bad: bytes) -> None:
    obs = http1.Http1Observer()
    obs.from_client(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [type(e) for e in obs.from_server(bad)][-1] is http1.Broken
    assert obs.broken is not None
    assert obs.from_server(b"HTTP/1.1 200 OK\r\n\r\n") == []
