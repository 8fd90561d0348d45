"""End to end, every other provider: the official SDKs in a pod played by a network namespace,
metered by the real sidecar, against the real production host names (needs root).

Layout (tests/support/e2e_pod.py, tests/support/netns.py)::

    pod netns                                        provider netns
      init: `podtally init-iptables`                   fake provider :443 (HTTP/2 + HTTP/1.1,
      sidecar: `podtally sidecar` (uid 1337)             tests/support/fake_h2.py), one cert for
      app (uid 1000): boto3, google-genai,               every TLS host below
        openai.AzureOpenAI, ollama, cohere, httpx    plain fake provider :11434 and :8000

The pod's /etc/hosts maps bedrock-runtime.us-east-1.amazonaws.com,
generativelanguage.googleapis.com, my-resource.openai.azure.com, api.cohere.com,
api.mistral.ai, api.groq.com, api.deepseek.com, api.x.ai, api.openai.com, `ollama` and `vllm`
to the provider. Every response body is a recorded one (tests/providers/testdata, see
SOURCES.md), sent part by part for streams (SSE events, NDJSON lines, AWS event-stream
messages); only requests are adapted to what the SDKs send.

All calls of all apps are made between two scrapes, then two more scrapes are taken: every
series is new, so the first shows it at 0 (zero first) and the second the exact sums.
Each call is told apart in the sidecar's records by the request id its response carries.

Also here: Content-Encoding (gzip, br, zstd, deflate zlib-wrapped and raw; a gzip'd SSE
stream, with and without include_usage injected) reaches the app exactly as sent while the
sidecar meters a decoded copy; HTTP/2 on both legs, both for httpx http2=True as shipped
(which lists http/1.1 first: the sidecar still prefers h2, as providers do) and for a client
offering h2 first.
"""

from __future__ import annotations

import base64
import gzip
import json
import struct
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import brotli
import pytest
import zstandard
from botocore.eventstream import EventStreamBuffer
from support.e2e_pod import E2E, ID_LABELS, TOKEN_TYPES, metered_pod, value
from support.eventstream import message
from support.fake_h2 import h2_provider_command
from support.fake_provider import Exchange, read_request_log
from support.netns import POD_ADDR, PROVIDER_ADDR
from support.payloads import DATA, expected, payload, without_usage
from support.sidecar import Sample, select

from podtally.pricing import PriceBook

pytestmark = pytest.mark.netns

BEDROCK = "bedrock-runtime.us-east-1.amazonaws.com"
GEMINI = "generativelanguage.googleapis.com"
AZURE = "my-resource.openai.azure.com"
COHERE = "api.cohere.com"
MISTRAL, GROQ, DEEPSEEK, XAI, OPENAI = (
    "api.mistral.ai", "api.groq.com", "api.deepseek.com", "api.x.ai", "api.openai.com")
TLS_HOSTS = (BEDROCK, GEMINI, AZURE, COHERE, MISTRAL, GROQ, DEEPSEEK, XAI, OPENAI)
OLLAMA, VLLM = "ollama:11434", "vllm:8000"

AZURE_OLD, AZURE_NEW = "2024-02-01", "2024-10-21"  # stream_options accepted since 2024-09-01
CLAUDE_ON_BEDROCK = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
NOVA = "amazon.nova-micro-v1:0"
KEYS = {"openai": "sk-test-SECRET-123", "azure": "azure-test-SECRET-key",
        "gemini": "AIza-test-SECRET", "cohere": "co-test-SECRET", "mistral": "mi-test-SECRET",
        "groq": "gsk_test_SECRET", "deepseek": "sk-ds-test-SECRET", "xai": "xai-test-SECRET"}
AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
           "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
STREAM_DELAY = 0.002  # between the parts of a stream: the sidecar sees a real stream
LAST_DELAY = 0.15  # before a stream's last part: the app must have its first part by then


# ------------------------------------------------------------------------- the payloads


def split_events(data: bytes) -> list[bytes]:
    """SSE events as sent, byte for byte (LF or CRLF framing), each with its blank line."""
    out, pos = [], 0
    while pos < len(data):
        cuts = [i + len(sep) for sep in (b"\n\n", b"\r\n\r\n") if (i := data.find(sep, pos)) >= 0]
        end = min(cuts) if cuts else len(data)
        out.append(data[pos:end])
        pos = end
    assert b"".join(out) == data
    return out


def split_lines(data: bytes) -> list[bytes]:
    out = data.splitlines(keepends=True)
    assert b"".join(out) == data
    return out


def eventstream_messages(stem: str) -> list[bytes]:
    """The recorded AWS event-stream, rebuilt message by message with support.eventstream
    from its decoded events; each rebuilt message must be the recorded one, byte for byte."""
    raw = base64.b64decode((DATA / f"{stem}.response.eventstream.b64").read_text())
    buf = EventStreamBuffer()
    buf.add_data(raw)
    out, pos = [], 0
    for msg in buf:
        (total,) = struct.unpack("!I", raw[pos:pos + 4])
        rebuilt = message({k: str(v) for k, v in msg.headers.items()}, msg.payload)
        assert rebuilt == raw[pos:pos + total], f"{stem}: message {len(out)} differs"
        out.append(rebuilt)
        pos += total
    assert pos == len(raw)
    return out


def recorded_events(stem: str) -> list[tuple[str, dict[str, Any]]]:
    buf = EventStreamBuffer()
    buf.add_data(base64.b64decode((DATA / f"{stem}.response.eventstream.b64").read_text()))
    return [(m.headers[":event-type"], json.loads(m.payload)) for m in buf]


def deflate_raw(data: bytes) -> bytes:
    co = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return co.compress(data) + co.flush()


ENCODERS = {
    "gzip": ("gzip", lambda d: gzip.compress(d, mtime=0)),
    "br": ("br", brotli.compress),
    "zstd": ("zstd", lambda d: zstandard.ZstdCompressor().compress(d)),
    "deflate": ("deflate", zlib.compress),  # RFC 9110: zlib-wrapped
    "deflate-raw": ("deflate", deflate_raw),  # what some servers send as "deflate"
}


def gzip_stream(events: list[bytes]) -> list[bytes]:
    """A gzip'd SSE stream as servers send it: one sync-flushed gzip piece per event."""
    co = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    parts = [co.compress(e) + co.flush(zlib.Z_SYNC_FLUSH) for e in events]
    parts.append(co.flush())
    return parts


def decode(coding: str, data: bytes) -> bytes:
    if coding == "gzip":
        return gzip.decompress(data)
    if coding == "br":
        return brotli.decompress(data)
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if coding == "deflate":
        try:
            return zlib.decompress(data)
        except zlib.error:
            return zlib.decompress(data, -zlib.MAX_WBITS)
    raise AssertionError(coding)


def request_json(stem: str, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    req = json.loads(payload(f"{stem}.request.json"))
    return {k: v for k, v in req.items() if k not in drop}


# ------------------------------------------------------------------------------ the calls


@dataclass(frozen=True)
class Call:
    """One LLM call of an app, and the recorded response the provider answers it with."""

    key: str  # also the request id the response carries (how its record is found)
    app: str
    stem: str  # the recording served; expected buckets and model from <stem>.expected.json
    provider: str
    host: str  # as the record names it (SNI / Host header)
    path: str  # the target the provider gets
    operation: str
    request_model: str
    stream: bool
    parts: tuple[bytes, ...]  # the provider's body, part by part (one HTTP chunk / DATA each)
    content_type: str
    injected: bool = False  # the sidecar adds stream_options.include_usage (and strips it)
    coding: str | None = None  # Content-Encoding of the body
    plain: bool = False  # plain HTTP (ollama, vllm)
    http2: str = ""  # httpx http2=True: "h2-first" (offers h2 first), "stock" (as shipped)
    rid_header: str = "x-request-id"
    request: dict[str, Any] | None = None  # the body httpx apps send

    @property
    def sent(self) -> bytes:
        return b"".join(self.parts)

    @property
    def at_client(self) -> bytes:
        """What the app must get: the provider's bytes, minus what include_usage added (which
        can only be cut from a plain body: an encoded one passes as sent)."""
        return without_usage(self.sent) if self.injected and not self.coding else self.sent

    @property
    def exp(self) -> dict[str, Any]:
        return expected(self.stem)

    @property
    def route(self) -> str:
        """The fake provider's route key: the path without its query, unless ?case= tells
        calls on the same path apart."""
        return self.path if "case=" in self.path else self.path.split("?", 1)[0]

    @property
    def url(self) -> str:
        return f"{'http' if self.plain else 'https'}://{self.host}{self.path}"


def _json(stem: str) -> tuple[bytes, ...]:
    return (payload(f"{stem}.response.json"),)


def _sse(stem: str) -> tuple[bytes, ...]:
    return tuple(split_events(payload(f"{stem}.response.sse")))


def _ndjson(stem: str) -> tuple[bytes, ...]:
    return tuple(split_lines(payload(f"{stem}.response.ndjson")))


JSON, SSE, NDJSON = "application/json", "text/event-stream", "application/x-ndjson"
CONVERSE = f"/model/{CLAUDE_ON_BEDROCK.replace(':', '%3A')}/converse"


def _calls() -> tuple[Call, ...]:
    calls = [
        # boto3 bedrock-runtime: the same Converse path twice (cache write, then cache read).
        Call("req-bedrock-converse-write", "boto", "bedrock-converse-cache-write",
             "aws.bedrock", BEDROCK, CONVERSE, "chat", CLAUDE_ON_BEDROCK, False,
             _json("bedrock-converse-cache-write"), JSON, rid_header="x-amzn-requestid"),
        Call("req-bedrock-converse-read", "boto", "bedrock-converse-cache-read",
             "aws.bedrock", BEDROCK, CONVERSE, "chat", CLAUDE_ON_BEDROCK, False,
             _json("bedrock-converse-cache-read"), JSON, rid_header="x-amzn-requestid"),
        Call("req-bedrock-converse-stream", "boto", "bedrock-converse-stream", "aws.bedrock",
             BEDROCK, f"/model/{NOVA.replace(':', '%3A')}/converse-stream", "chat", NOVA, True,
             tuple(eventstream_messages("bedrock-converse-stream")),
             "application/vnd.amazon.eventstream", rid_header="x-amzn-requestid"),
        # google-genai
        Call("req-gemini-generate", "genai", "gemini-generate-content-thinking", "gcp.gemini",
             GEMINI, "/v1beta/models/gemini-2.5-flash:generateContent", "generate_content",
             "gemini-2.5-flash", False, _json("gemini-generate-content-thinking"),
             "application/json; charset=UTF-8"),
        Call("req-gemini-stream", "genai", "gemini-stream-sse", "gcp.gemini", GEMINI,
             "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
             "generate_content", "gemini-2.5-flash", True, _sse("gemini-stream-sse"), SSE),
        # openai.AzureOpenAI: the deployment is the request model.
        Call("req-azure-chat", "azure", "azure-chat-reasoning", "azure.ai.openai", AZURE,
             f"/openai/deployments/gpt-5-nano/chat/completions?api-version={AZURE_NEW}",
             "chat", "gpt-5-nano", False, _json("azure-chat-reasoning"), JSON),
        # An api-version that rejects stream_options: nothing injected, the tokens unknown.
        Call("req-azure-stream-old", "azure", "azure-chat-stream-no-usage", "azure.ai.openai",
             AZURE, "/openai/deployments/openllmetry-testing/chat/completions"
             f"?api-version={AZURE_OLD}", "chat", "openllmetry-testing", True,
             _sse("azure-chat-stream-no-usage"), SSE),
        # A newer one: include_usage injected; the provider answers with a recorded stream
        # that carries usage (an OpenAI chat stream: Azure serves the same format).
        Call("req-azure-stream-new", "azure", "openai-chat-stream-usage", "azure.ai.openai",
             AZURE, f"/openai/deployments/gpt-4o-mini/chat/completions?api-version={AZURE_NEW}",
             "chat", "gpt-4o-mini", True, _sse("openai-chat-stream-usage"), SSE, injected=True),
        # ollama (plain HTTP): /api/chat twice (non-stream, stream), /api/generate twice.
        Call("req-ollama-chat", "ollama", "ollama-chat", "ollama", OLLAMA, "/api/chat", "chat",
             "llama3", False, _json("ollama-chat"), JSON, plain=True),
        Call("req-ollama-chat-stream", "ollama", "ollama-chat-stream", "ollama", OLLAMA,
             "/api/chat", "chat", "llama3", True, _ndjson("ollama-chat-stream"), NDJSON,
             plain=True),
        Call("req-ollama-generate", "ollama", "ollama-generate", "ollama", OLLAMA,
             "/api/generate", "text_completion", "llama3", False, _json("ollama-generate"),
             JSON, plain=True),
        Call("req-ollama-generate-stream", "ollama", "ollama-generate-stream", "ollama", OLLAMA,
             "/api/generate", "text_completion", "llama3", True,
             _ndjson("ollama-generate-stream"), NDJSON, plain=True),
        # cohere ClientV2
        Call("req-cohere-chat", "cohere", "cohere-chat-cached", "cohere", COHERE,
             "/v2/chat?case=chat", "chat", "command-r7b-12-2024", False,
             _json("cohere-chat-cached"), JSON),
        Call("req-cohere-stream", "cohere", "cohere-chat-stream", "cohere", COHERE,
             "/v2/chat?case=stream", "chat", "command", True, _sse("cohere-chat-stream"), SSE),
    ]
    # httpx: the recorded requests as they are.
    for key, stem, provider, host, path, stream in (
        ("mistral-chat", "mistral-chat", "mistral_ai", MISTRAL, "/v1/chat/completions", False),
        ("mistral-stream", "mistral-chat-stream", "mistral_ai", MISTRAL,
         "/v1/chat/completions", True),
        ("groq-chat", "groq-chat", "groq", GROQ, "/openai/v1/chat/completions", False),
        ("groq-stream", "groq-chat-stream", "groq", GROQ, "/openai/v1/chat/completions", True),
        ("deepseek-chat", "deepseek-reasoner", "deepseek", DEEPSEEK, "/chat/completions", False),
        ("deepseek-stream", "deepseek-reasoner-stream", "deepseek", DEEPSEEK,
         "/chat/completions", True),
        ("xai-chat", "xai-chat-cached", "x_ai", XAI, "/v1/chat/completions", False),
    ):
        req = request_json(stem)
        calls.append(Call(f"req-{key}", "httpx", stem, provider, host, f"{path}?case={key}",
                          "chat", req["model"], stream, _sse(stem) if stream else _json(stem),
                          SSE if stream else JSON, request=req))
    # vLLM: plain HTTP to any host; a stream that did not ask for usage gets it injected.
    calls += [
        Call("req-vllm-chat", "httpx", "openai-chat", "openai_compatible", VLLM,
             "/v1/chat/completions?case=vllm-chat", "chat", "gpt-4o", False,
             _json("openai-chat"), JSON, plain=True, request=request_json("openai-chat")),
        Call("req-vllm-stream", "httpx", "openai-chat-stream-usage", "openai_compatible", VLLM,
             "/v1/chat/completions?case=vllm-stream", "chat", "gpt-4o-mini", True,
             _sse("openai-chat-stream-usage"), SSE, injected=True, plain=True,
             request=request_json("openai-chat-stream-usage", drop=("stream_options",))),
    ]
    # Content-Encoding: the provider compresses; the app gets the compressed bytes as sent.
    for name, (coding, encode) in ENCODERS.items():
        calls.append(Call(f"req-ce-{name}", "httpx", "openai-chat", "openai", OPENAI,
                          f"/v1/chat/completions?case=ce-{name}", "chat", "gpt-4o", False,
                          (encode(payload("openai-chat.response.json")),), JSON, coding=coding,
                          request=request_json("openai-chat")))
    gzipped = tuple(gzip_stream(list(_sse("openai-chat-stream-usage"))))
    calls.append(Call("req-ce-gzip-stream", "httpx", "openai-chat-stream-usage", "openai",
                      OPENAI, "/v1/chat/completions?case=ce-gzip-stream", "chat", "gpt-4o-mini",
                      True, gzipped, SSE, coding="gzip",
                      request=request_json("openai-chat-stream-usage")))
    # include_usage injected (Accept-Encoding dropped), but the provider compresses anyway:
    # the usage chunk cannot be cut from the gzip'd bytes, so they pass as sent, as they come.
    calls.append(Call("req-ce-gzip-stream-injected", "httpx", "openai-chat-stream-usage",
                      "openai", OPENAI, "/v1/chat/completions?case=ce-gzip-stream-injected",
                      "chat", "gpt-4o-mini", True, gzipped, SSE, coding="gzip", injected=True,
                      request=request_json("openai-chat-stream-usage",
                                           drop=("stream_options",))))
    # HTTP/2 on both legs; the stream did not ask for usage: injected and stripped over h2.
    no_usage_asked = request_json("openai-chat-stream-usage", drop=("stream_options",))
    calls += [
        Call("req-h2-chat", "httpx", "openai-chat", "openai", OPENAI,
             "/v1/chat/completions?case=h2-chat", "chat", "gpt-4o", False,
             _json("openai-chat"), JSON, http2="h2-first", request=request_json("openai-chat")),
        Call("req-h2-stream", "httpx", "openai-chat-stream-usage", "openai", OPENAI,
             "/v1/chat/completions?case=h2-stream", "chat", "gpt-4o-mini", True,
             _sse("openai-chat-stream-usage"), SSE, injected=True, http2="h2-first",
             request=no_usage_asked),
        # httpx as shipped offers ALPN http/1.1 before h2; the sidecar (mitmproxy) follows
        # the client's preference, the provider its own: HTTP/1.1 in, HTTP/2 out.
        Call("req-h2-stock-stream", "httpx", "openai-chat-stream-usage", "openai", OPENAI,
             "/v1/chat/completions?case=h2-stock-stream", "chat", "gpt-4o-mini", True,
             _sse("openai-chat-stream-usage"), SSE, injected=True, http2="stock",
             request=no_usage_asked),
    ]
    return tuple(calls)


CALLS = _calls()
BY_KEY = {c.key: c for c in CALLS}
APPS = ("boto", "genai", "azure", "ollama", "cohere", "httpx")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _routes(calls: list[Call]) -> dict[str, Any]:
    """Routes JSON: calls sharing a route are answered in turn (a `sequence`)."""
    by_route: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in calls:
        headers = [["content-type", c.content_type], [c.rid_header, c.key]]
        if c.coding:
            headers.append(["content-encoding", c.coding])
        if c.stream:
            headers.append(["cache-control", "no-cache"])
        by_route[c.route].append({
            "status": 200, "headers": headers, "chunked": c.stream,
            "body": [{"data_b64": _b64(p), "delay": 0 if not c.stream else
                      LAST_DELAY if i == len(c.parts) - 1 else STREAM_DELAY}
                     for i, p in enumerate(c.parts)],
        })
    routes = []
    for route, scripts in by_route.items():
        if len(scripts) == 1:
            routes.append({"method": "POST", "path": route, **scripts[0]})
        else:
            routes.append({"method": "POST", "path": route, "sequence": scripts})
    return {"routes": routes}


# ---------------------------------------------------------------------------- the apps

# Every httpx-based app tees, through httpx event hooks, each request body and the raw
# response bytes as read off the connection (before any decoding), per call key.
TEE = r"""
import base64, json, sys, time
import httpx

spec = json.loads(open(sys.argv[1]).read())
current = [None]
exchanges = []

def on_request(request):
    exchanges.append({"key": current[0], "url": str(request.url),
                      "request_b64": base64.b64encode(request.content).decode(), "chunks": []})

def on_response(response):
    entry = exchanges[-1]
    entry["status"] = response.status_code
    entry["http_version"] = response.http_version
    inner = response.stream

    class Tee(httpx.SyncByteStream):
        def __iter__(self):
            for chunk in inner:
                if chunk and "t_first" not in entry:
                    entry["t_first"] = time.monotonic()
                entry["chunks"].append(chunk)
                yield chunk

        def close(self):
            inner.close()

    response.stream = Tee()

HOOKS = {"request": [on_request], "response": [on_response]}
out = {"results": {}}
res = out["results"]

def finish():
    for e in exchanges:
        e["response_b64"] = base64.b64encode(b"".join(e.pop("chunks"))).decode()
    out["exchanges"] = exchanges
    print(json.dumps(out, default=str))
"""

# boto3: botocore's own hooks. before-send sees the signed request; before-parse the raw
# response: the body (Converse) or the event stream, teed as botocore reads it.
BOTO_APP = r"""
import base64, json, sys, time
import boto3
from botocore.config import Config

spec = json.loads(open(sys.argv[1]).read())
current = [None]
wire = {}

class Tee:
    def __init__(self, inner, sink):
        self.inner, self.sink = inner, sink

    def stream(self, *args, **kwargs):
        for chunk in self.inner.stream(*args, **kwargs):
            if chunk and "t_first" not in wire[current[0]]:
                wire[current[0]]["t_first"] = time.monotonic()
            self.sink.append(chunk)
            yield chunk

    def close(self):
        self.inner.close()

def before_send(request, **kwargs):
    body = request.body if isinstance(request.body, bytes) else (request.body or b"").encode()
    wire[current[0]] = {"url": request.url, "request_b64": base64.b64encode(body).decode(),
                        "authorization": request.headers.get("Authorization", b"").decode()
                        if isinstance(request.headers.get("Authorization"), bytes)
                        else request.headers.get("Authorization"), "chunks": []}

def before_parse(response_dict, **kwargs):
    entry = wire[current[0]]
    entry["status"] = response_dict["status_code"]
    body = response_dict["body"]
    if isinstance(body, bytes):
        entry["chunks"].append(body)
    else:
        response_dict["body"] = Tee(body, entry["chunks"])

client = boto3.client("bedrock-runtime", region_name="us-east-1",
                      config=Config(retries={"total_max_attempts": 1}))
client.meta.events.register("before-send.bedrock-runtime", before_send)
client.meta.events.register("before-parse.bedrock-runtime", before_parse)
res = {}
for key in ("req-bedrock-converse-write", "req-bedrock-converse-read"):
    current[0] = key
    r = client.converse(modelId=spec["claude"], **spec["converse"])
    res[key] = {"usage": r["usage"], "stopReason": r["stopReason"],
                "content": r["output"]["message"]["content"],
                "request_id": r["ResponseMetadata"]["RequestId"]}

current[0] = "req-bedrock-converse-stream"
r = client.converse_stream(modelId=spec["nova"], **spec["converse_stream"])
events = list(r["stream"])
res[current[0]] = {"events": events, "request_id": r["ResponseMetadata"]["RequestId"]}

for e in wire.values():
    e["response_b64"] = base64.b64encode(b"".join(e.pop("chunks"))).decode()
print(json.dumps({"results": res, "wire": wire}, default=str))
"""

GENAI_APP = TEE + r"""
from google import genai
from google.genai import types

client = genai.Client(api_key=spec["key"], http_options=types.HttpOptions(
    client_args={"event_hooks": HOOKS}))
current[0] = "req-gemini-generate"
r = client.models.generate_content(
    model="gemini-2.5-flash", contents="Hello!",
    config=types.GenerateContentConfig(system_instruction="You are a chatbot.",
                                       response_modalities=["TEXT"]))
res[current[0]] = {"text": r.text, "usage": r.usage_metadata.model_dump(exclude_none=True),
                   "model_version": r.model_version, "response_id": r.response_id}
current[0] = "req-gemini-stream"
chunks = list(client.models.generate_content_stream(
    model="gemini-2.5-flash", contents="Count from 1 to 30, one number per line, digits only.",
    config=types.GenerateContentConfig(response_modalities=["TEXT"])))
res[current[0]] = {"text": "".join(c.text or "" for c in chunks), "chunks": len(chunks),
                   "usage": chunks[-1].usage_metadata.model_dump(exclude_none=True)}
finish()
"""

AZURE_APP = TEE + r"""
import openai

def azure(version):
    return openai.AzureOpenAI(azure_endpoint="https://my-resource.openai.azure.com",
                              api_key=spec["key"], api_version=version, max_retries=0,
                              http_client=openai.DefaultHttpxClient(event_hooks=HOOKS))

new, old = azure(spec["new"]), azure(spec["old"])
current[0] = "req-azure-chat"
c = new.chat.completions.create(model="gpt-5-nano", reasoning_effort="low",
                                messages=[{"role": "user", "content": "Count r's in strawberry"}])
res[current[0]] = {"model": c.model, "content": c.choices[0].message.content,
                   "usage": c.usage.model_dump()}

def stream(client, key, deployment):
    current[0] = key
    chunks = list(client.chat.completions.create(
        model=deployment, stream=True,
        messages=[{"role": "user", "content": "Tell me a joke about opentelemetry"}]))
    res[key] = {
        "models": sorted({ch.model for ch in chunks}),
        "content": "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices),
        "chunks": len(chunks), "usage_seen": sum(ch.usage is not None for ch in chunks),
    }

stream(old, "req-azure-stream-old", "openllmetry-testing")
stream(new, "req-azure-stream-new", "gpt-4o-mini")
finish()
"""

OLLAMA_APP = TEE + r"""
import ollama

client = ollama.Client(host="http://ollama:11434", event_hooks=HOOKS)
msgs = [{"role": "user", "content": "Tell me a joke about OpenTelemetry"}]
prompt = "Tell me a joke about OpenTelemetry"

def summary(parts, text):
    last = parts[-1]
    return {"text": text, "parts": len(parts), "done": last.done,
            "prompt_eval_count": last.prompt_eval_count, "eval_count": last.eval_count}

current[0] = "req-ollama-chat"
r = client.chat(model="llama3", messages=msgs, stream=False)
res[current[0]] = summary([r], r.message.content)
current[0] = "req-ollama-chat-stream"
parts = list(client.chat(model="llama3", messages=msgs, stream=True))
res[current[0]] = summary(parts, "".join(p.message.content for p in parts))
current[0] = "req-ollama-generate"
r = client.generate(model="llama3", prompt=prompt, stream=False)
res[current[0]] = summary([r], r.response)
current[0] = "req-ollama-generate-stream"
parts = list(client.generate(model="llama3", prompt=prompt, stream=True))
res[current[0]] = summary(parts, "".join(p.response for p in parts))
finish()
"""

COHERE_APP = TEE + r"""
import cohere

co = cohere.ClientV2(api_key=spec["key"], httpx_client=httpx.Client(event_hooks=HOOKS,
                                                                     timeout=30))
current[0] = "req-cohere-chat"
r = co.chat(model="command-r7b-12-2024", messages=[{"role": "user", "content": "Hello"}],
            request_options={"max_retries": 0,
                             "additional_query_parameters": {"case": "chat"}})
res[current[0]] = {"text": r.message.content[0].text, "finish_reason": r.finish_reason,
                   "billed": r.usage.billed_units.dict(), "id": r.id}
current[0] = "req-cohere-stream"
events = list(co.chat_stream(
    model="command", messages=[{"role": "user", "content": "Tell me a joke, pirate style"}],
    request_options={"max_retries": 0, "additional_query_parameters": {"case": "stream"}}))
end = [e for e in events if e.type == "message-end"]
res[current[0]] = {
    "text": "".join(e.delta.message.content.text for e in events if e.type == "content-delta"),
    "types": [e.type for e in events],
    "billed": end[0].delta.usage.billed_units.dict() if end else None,
}
finish()
"""

# Raw httpx: the recorded request bodies; raw bytes off the connection via iter_raw (no
# decoding: Accept-Encoding is sent, Content-Encoding'd bodies arrive as sent).
HTTPX_APP = TEE + r"""
import os, ssl

class H2First(ssl.SSLContext):
    # httpcore offers ALPN ["http/1.1", "h2"]; curl, browsers and Go offer h2 first.
    def set_alpn_protocols(self, protocols):
        super().set_alpn_protocols(sorted(protocols, key=lambda p: p != "h2"))

h2_first = H2First(ssl.PROTOCOL_TLS_CLIENT)
h2_first.load_verify_locations(os.environ["SSL_CERT_FILE"])
clients = {
    "": httpx.Client(timeout=30, event_hooks=HOOKS),
    "h2-first": httpx.Client(timeout=30, http2=True, verify=h2_first, event_hooks=HOOKS),
    "stock": httpx.Client(timeout=30, http2=True, event_hooks=HOOKS),
}
for call in spec["calls"]:
    current[0] = call["key"]
    client = clients[call["http2"]]
    with client.stream("POST", call["url"], headers=call["headers"],
                       content=base64.b64decode(call["body_b64"])) as r:
        raw = b"".join(r.iter_raw())
        res[call["key"]] = {"status": r.status_code, "http_version": r.http_version,
                            "raw_b64": base64.b64encode(raw).decode(),
                            "headers": list(r.headers.multi_items())}
finish()
"""

_BEARER = {OPENAI: "openai", MISTRAL: "mistral", GROQ: "groq", DEEPSEEK: "deepseek", VLLM: "openai",
           XAI: "xai"}


def _httpx_spec() -> dict[str, Any]:
    calls = []
    for c in CALLS:
        if c.app != "httpx":
            continue
        assert c.request is not None
        calls.append({
            "key": c.key, "url": c.url, "http2": c.http2,
            "headers": {"authorization": f"Bearer {KEYS[_BEARER[c.host]]}",
                        "content-type": "application/json",
                        "accept-encoding": "gzip, deflate, br, zstd"},
            "body_b64": _b64(json.dumps(c.request).encode()),
        })
    return {"calls": calls}


def _boto_spec() -> dict[str, Any]:
    cached = request_json("bedrock-converse-cache-write")  # recorded without its messages
    streamed = request_json("bedrock-converse-stream")
    return {
        "claude": CLAUDE_ON_BEDROCK, "nova": NOVA,
        "converse": {**cached, "messages": [
            {"role": "user", "content": [{"text": "Which tools can you call?"}]}]},
        "converse_stream": streamed,
    }


APP_CODE = {"boto": BOTO_APP, "genai": GENAI_APP, "azure": AZURE_APP, "ollama": OLLAMA_APP,
            "cohere": COHERE_APP, "httpx": HTTPX_APP}


def _app_spec(app: str) -> dict[str, Any]:
    return {
        "boto": _boto_spec,
        "genai": lambda: {"key": KEYS["gemini"]},
        "azure": lambda: {"key": KEYS["azure"], "old": AZURE_OLD, "new": AZURE_NEW},
        "ollama": dict,
        "cohere": lambda: {"key": KEYS["cohere"]},
        "httpx": _httpx_spec,
    }[app]()


# ------------------------------------------------------------------------------ the run


@pytest.fixture(scope="module")
def e2e() -> Iterator[E2E]:
    hosts = {h: PROVIDER_ADDR for h in (*TLS_HOSTS, "ollama", "vllm")}
    with metered_pod(
        hosts=hosts, tls_hosts=TLS_HOSTS,
        routes=lambda _release: _routes([c for c in CALLS if not c.plain]),
        provider_argv=h2_provider_command,
        plain_routes=_routes([c for c in CALLS if c.plain]),
        plain_listen=["0.0.0.0:11434", "0.0.0.0:8000"],
        # The default capture ports are 443 and 80: a pod calling Ollama or vLLM on their own
        # ports is configured to have those captured too.
        init_args=["--ports=443,80,11434,8000"],
        app_env={**AWS_ENV},
    ) as env:
        env.app_env["AWS_CA_BUNDLE"] = str(env.podtally_ca)
        yield env


@dataclass
class Run:
    apps: dict[str, dict[str, Any]]  # app name -> its JSON output
    records: dict[str, dict[str, Any]]  # call key -> the sidecar's record
    all_records: list[dict[str, Any]]
    before: dict[Sample, float]
    first: dict[Sample, float]  # the first scrape after the calls: new series at zero
    after: dict[Sample, float]
    tls_log: list[Exchange]
    plain_log: list[Exchange]

    def upstream(self, call: Call) -> Exchange:
        """What the provider received for `call` (calls sharing a route: in call order)."""
        log = self.plain_log if call.plain else self.tls_log
        same = [c.key for c in CALLS if c.plain == call.plain and c.route == call.route]
        got = [ex for ex in log if _route_of(ex.path, call) == call.route]
        assert len(got) == len(same), f"{call.key}: provider got {[ex.path for ex in got]}"
        return got[same.index(call.key)]

    def wire(self, call: Call) -> dict[str, Any]:
        """The app's side of the exchange: request body sent, raw response bytes read."""
        out = self.apps[call.app]
        if call.app == "boto":
            return dict(out["wire"][call.key])
        (ex,) = [e for e in out["exchanges"] if e["key"] == call.key]
        return dict(ex)


def _route_of(target: str, call: Call) -> str:
    return target if "case=" in call.route else target.split("?", 1)[0]


@pytest.fixture(scope="module")
def run(e2e: E2E) -> Run:
    """Every app makes its calls once (the apps run side by side); records and metrics
    around them are kept."""
    e2e.alive()
    before = e2e.metrics()
    assert not select(before, "podtally_llm_requests_total")
    procs = {}
    for app in APPS:
        spec = e2e.dir / f"spec-{app}.json"
        spec.write_text(json.dumps(_app_spec(app)))
        spec.chmod(0o644)
        procs[app] = e2e.app_popen(APP_CODE[app], str(spec))
    apps = {app: e2e.app_result(p, timeout=90) for app, p in procs.items()}
    records = e2e.wait_records(len(CALLS))
    first = e2e.scrape()
    after = e2e.scrape()
    by_key: dict[str, dict[str, Any]] = {}
    for rec in records:
        assert rec["request_id"] not in by_key, f"two records for {rec['request_id']}"
        by_key[rec["request_id"]] = rec
    assert e2e.plain_log is not None
    return Run(apps, by_key, records, before, first, after,
               read_request_log(e2e.provider_log), read_request_log(e2e.plain_log))


# ------------------------------------------------------------------------------ the tests


def test_one_exact_record_per_call(e2e: E2E, run: Run) -> None:
    assert len(run.all_records) == len(CALLS), json.dumps(run.all_records, indent=1)
    assert set(run.records) == set(BY_KEY), sorted(run.records)
    prices = PriceBook()
    for call in CALLS:
        rec, exp = run.records[call.key], call.exp
        what = f"{call.key}: {json.dumps(rec)}"
        assert {k: rec[k] for k in ID_LABELS} == ID_LABELS, what
        assert (rec["provider"], rec["host"], rec["operation"], rec["status"]) == (
            call.provider, call.host, call.operation, "200"), what
        assert rec["model"] == exp["model"], what
        assert rec["request_model"] == call.request_model, what
        assert rec["tokens"] == exp["tokens"], what
        assert rec["tokens_total"] == sum((exp["tokens"] or {}).values()), what
        assert rec["tokens_estimated"] is False, what
        assert rec["service_tier"] == exp["service_tier"], what
        assert rec["streamed"] is call.stream, what
        assert rec["usage_injected"] is call.injected, what
        assert rec["error"] is None, what
        if call.stream and exp["tokens"] is not None:
            ttft = rec["time_to_first_token_seconds"]
            assert ttft is not None and 0 <= ttft <= rec["duration_seconds"], what
        if not call.stream:
            assert rec["time_to_first_token_seconds"] is None, what
        if exp["tokens"] is None:
            assert rec["cost_usd"] == 0 and rec["priced"] is False, what
            continue
        price = prices.price(call.provider, exp["model"], exp["tokens"], rec["service_tier"],
                             datetime.fromisoformat(rec["timestamp"]))
        assert rec["priced"] is price.priced, what
        assert rec["cost_usd"] == pytest.approx(price.cost_usd, rel=1e-9), what


def _series(calls: tuple[Call, ...]) -> tuple[Counter[tuple[str, str, str]],
                                              dict[tuple[str, str], Counter[str]]]:
    requests: Counter[tuple[str, str, str]] = Counter()
    tokens: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for c in calls:
        exp = c.exp
        requests[(c.provider, exp["model"], c.operation)] += 1
        if exp["tokens"] is not None:
            tokens[(c.provider, exp["model"])].update(
                {t: 0 for t in TOKEN_TYPES} | exp["tokens"])  # every bucket, zeros too
    return requests, tokens


def test_exact_metrics_zero_first(e2e: E2E, run: Run) -> None:
    requests, tokens = _series(CALLS)
    name = "podtally_llm_requests_total"
    for (provider, model, operation), n in requests.items():
        labels = {**ID_LABELS, "provider": provider, "model": model,
                  "operation": operation, "code": "200"}
        assert value(run.before, name, **labels) is None
        # Zero first: the first scrape after the calls shows every new series at 0 ...
        assert value(run.first, name, **labels) == 0, labels
        # ... and the next one the calls.
        assert value(run.after, name, **labels) == n, labels
    assert len(select(run.after, name)) == len(requests)  # no other series

    for (provider, model), buckets in tokens.items():
        who = {**ID_LABELS, "provider": provider, "model": model}
        first = {dict(lbl)["token_type"]: v
                 for lbl, v in select(run.first, "podtally_llm_tokens_total", **who).items()}
        assert first == dict.fromkeys(TOKEN_TYPES, 0.0), who
        got = {dict(lbl)["token_type"]: v
               for lbl, v in select(run.after, "podtally_llm_tokens_total", **who).items()}
        assert got == {t: float(buckets[t]) for t in TOKEN_TYPES}, who
    # A call with unknown tokens counts as a request, never as tokens.
    assert {(dict(lbl)["provider"], dict(lbl)["model"])
            for lbl in select(run.after, "podtally_llm_tokens_total")} == set(tokens)

    by_series: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for c in CALLS:
        by_series[(c.provider, c.exp["model"])].append(run.records[c.key])
    for (provider, model), recs in by_series.items():
        who = {**ID_LABELS, "provider": provider, "model": model}
        with_tokens = [r for r in recs if r["tokens"] is not None]
        cost = value(run.after, "podtally_llm_cost_usd_total", **who)
        if with_tokens:
            assert cost == pytest.approx(sum(r["cost_usd"] for r in with_tokens), rel=1e-9)
        else:
            assert cost is None
        unpriced = sum(1 for r in with_tokens if not r["priced"])
        assert value(run.after, "podtally_llm_unpriced_requests_total", **who) == (
            unpriced or None), who
        assert value(run.after, "podtally_llm_estimated_requests_total", **who) is None
        slim = {"namespace": "shop", "team": "payments", "provider": provider, "model": model}
        assert value(run.after, "podtally_llm_request_duration_seconds_count", **slim) == len(
            recs)
        ttfts = sum(1 for r in recs if r["time_to_first_token_seconds"] is not None)
        assert value(run.after, "podtally_llm_time_to_first_token_seconds_count", **slim) == (
            ttfts or None), slim
    assert sum(select(run.after, "podtally_metering_faults_total").values()) == 0


@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.key)
def test_app_gets_the_providers_bytes(run: Run, call: Call) -> None:
    """Client side: the raw response bytes (as read off the connection, before any
    decoding) are the provider's, less the usage the sidecar asked for on its own."""
    wire = run.wire(call)
    assert wire["status"] == 200
    got = base64.b64decode(wire["response_b64"] if call.app != "httpx"
                           else run.apps["httpx"]["results"][call.key]["raw_b64"])
    assert got == call.at_client, f"{call.key}: the app's bytes differ from the provider's"
    if call.app == "httpx":
        assert got == base64.b64decode(wire["response_b64"])  # the tee saw the same


@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.key)
def test_provider_gets_the_apps_request(run: Run, call: Call) -> None:
    ex = run.upstream(call)
    wire = run.wire(call)
    app_body = base64.b64decode(wire["request_b64"])
    host = call.host.split(":", 1)[0]
    assert ex.client is not None and ex.client.rsplit(":", 1)[0] == POD_ADDR
    if call.plain:
        assert ex.sni is None and ex.header("host") == call.host
    else:
        assert ex.sni == host
        assert (ex.header(":authority") if call.http2 else ex.header("host")) == host
    assert ex.path == call.path
    if call.injected:
        sent = json.loads(app_body)
        assert "stream_options" not in sent
        assert ex.json() == {**sent, "stream_options": {"include_usage": True}}
    else:
        assert ex.body == app_body, f"{call.key}: request body altered"
    assert ex.outcome == "complete", call.key
    credential = {  # each SDK's own way, relayed as is
        "openai": ("authorization", f"Bearer {KEYS['openai']}"),
        "openai_compatible": ("authorization", f"Bearer {KEYS['openai']}"),
        "azure.ai.openai": ("api-key", KEYS["azure"]),
        "gcp.gemini": ("x-goog-api-key", KEYS["gemini"]),
        "cohere": ("authorization", f"Bearer {KEYS['cohere']}"),
        "mistral_ai": ("authorization", f"Bearer {KEYS['mistral']}"),
        "groq": ("authorization", f"Bearer {KEYS['groq']}"),
        "deepseek": ("authorization", f"Bearer {KEYS['deepseek']}"),
        "x_ai": ("authorization", f"Bearer {KEYS['xai']}"),
    }.get(call.provider)
    if credential is not None:
        assert ex.header(credential[0]) == credential[1], call.key
    if call.provider == "aws.bedrock":  # SigV4 signed by boto3, relayed as is
        assert wire["authorization"].startswith(
            f"AWS4-HMAC-SHA256 Credential={AWS_ENV['AWS_ACCESS_KEY_ID']}/")
        assert ex.header("authorization") == wire["authorization"]
    if call.app == "httpx":
        # An injected stream must come back plain (the usage chunk is cut from the SSE text):
        # the sidecar drops Accept-Encoding then, and only then.
        assert ex.header("accept-encoding") == (
            None if call.injected else "gzip, deflate, br, zstd"), call.key


@pytest.mark.parametrize("call", [c for c in CALLS if c.stream], ids=lambda c: c.key)
def test_streams_reach_the_app_as_they_are_sent(run: Run, call: Call) -> None:
    """The sidecar passes a stream on as it comes: the app holds the first part before the
    provider has sent the last one (LAST_DELAY after the one before)."""
    t_first = run.wire(call)["t_first"]
    assert t_first < run.upstream(call).sent_chunks_at[-1], (
        f"{call.key}: the app got nothing until the provider's last part")


def test_boto3_bedrock(run: Run) -> None:
    res = run.apps["boto"]["results"]
    for key in ("req-bedrock-converse-write", "req-bedrock-converse-read"):
        rec = json.loads(BY_KEY[key].sent)
        assert res[key]["request_id"] == key
        assert res[key]["stopReason"] == rec["stopReason"]
        assert res[key]["content"] == rec["output"]["message"]["content"]
        # botocore keeps the members its model knows (not the duplicate *Count ones).
        usage = res[key]["usage"]
        assert {"inputTokens", "outputTokens", "cacheReadInputTokens",
                "cacheWriteInputTokens"} <= set(usage)
        assert usage == {k: rec["usage"][k] for k in usage}
    s = res["req-bedrock-converse-stream"]
    assert s["request_id"] == "req-bedrock-converse-stream"
    recorded = recorded_events("bedrock-converse-stream")
    assert [next(iter(e)) for e in s["events"]] == [t for t, _ in recorded]
    text = "".join(p["delta"]["text"] for t, p in recorded if t == "contentBlockDelta")
    assert "".join(e["contentBlockDelta"]["delta"]["text"]
                   for e in s["events"] if "contentBlockDelta" in e) == text
    meta = next(p for t, p in recorded if t == "metadata")
    usage = s["events"][-1]["metadata"]["usage"]
    assert {"inputTokens", "outputTokens"} <= set(usage)
    assert usage == {k: meta["usage"][k] for k in usage}


def test_google_genai(run: Run) -> None:
    res = run.apps["genai"]["results"]
    rec = json.loads(BY_KEY["req-gemini-generate"].sent)
    g = res["req-gemini-generate"]
    assert g["text"] == rec["candidates"][0]["content"]["parts"][0]["text"]
    assert g["model_version"] == rec["modelVersion"] and g["response_id"] == rec["responseId"]
    for k in ("promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount"):
        snake = "".join("_" + ch.lower() if ch.isupper() else ch for ch in k)
        assert g["usage"][snake] == rec["usageMetadata"][k]
    events = [json.loads(e.split(b"data: ", 1)[1]) for e in BY_KEY["req-gemini-stream"].parts]
    s = res["req-gemini-stream"]
    assert s["chunks"] == len(events)
    assert s["text"] == "".join(p.get("text", "") for e in events
                                for p in e["candidates"][0]["content"]["parts"]
                                if not p.get("thought"))
    assert s["usage"]["candidates_token_count"] == events[-1]["usageMetadata"][
        "candidatesTokenCount"]


def _sse_json(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(e.strip().removeprefix(b"data: ")) for e in split_events(data)
            if e.strip() != b"data: [DONE]"]


def test_azure_openai(run: Run) -> None:
    res = run.apps["azure"]["results"]
    rec = json.loads(BY_KEY["req-azure-chat"].sent)
    c = res["req-azure-chat"]
    assert c["model"] == rec["model"]
    assert c["content"] == rec["choices"][0]["message"]["content"]
    assert c["usage"]["completion_tokens_details"]["reasoning_tokens"] == rec["usage"][
        "completion_tokens_details"]["reasoning_tokens"]
    for key in ("req-azure-stream-old", "req-azure-stream-new"):
        call, s = BY_KEY[key], res[key]
        events = _sse_json(call.at_client)
        assert s["usage_seen"] == 0, key  # never asked for, never seen
        assert s["chunks"] == len(events), key
        assert s["content"] == "".join(e["choices"][0]["delta"].get("content") or ""
                                       for e in events if e["choices"]), key
    # Old api-version: no stream_options (Azure would reject it), so no usage to meter.
    old = run.upstream(BY_KEY["req-azure-stream-old"])
    assert "stream_options" not in old.json()
    assert run.records["req-azure-stream-old"]["tokens"] is None
    assert set(res["req-azure-stream-old"]["models"]) == {"", "gpt-35-turbo"}


def test_ollama(run: Run) -> None:
    res = run.apps["ollama"]["results"]
    for key in ("req-ollama-chat", "req-ollama-chat-stream", "req-ollama-generate",
                "req-ollama-generate-stream"):
        call, got = BY_KEY[key], res[key]
        lines = [json.loads(line) for line in call.parts]
        field = "message" if "chat" in key else "response"
        text = "".join(ln["message"]["content"] if field == "message" else ln["response"]
                       for ln in lines)
        assert got["text"] == text, key
        assert got["parts"] == len(lines) and got["done"] is True, key
        assert (got["prompt_eval_count"], got["eval_count"]) == (
            lines[-1]["prompt_eval_count"], lines[-1]["eval_count"]), key


def test_cohere(run: Run) -> None:
    res = run.apps["cohere"]["results"]
    rec = json.loads(BY_KEY["req-cohere-chat"].sent)
    c = res["req-cohere-chat"]
    assert c["text"] == rec["message"]["content"][0]["text"] and c["id"] == rec["id"]
    assert c["billed"] == rec["usage"]["billed_units"]
    s = res["req-cohere-stream"]
    events = _sse_json(b"".join(e.split(b"\n", 1)[1] if e.startswith(b"event:") else e
                                for e in BY_KEY["req-cohere-stream"].parts))
    assert s["types"] == [e["type"] for e in events]
    assert s["text"] == "".join(e["delta"]["message"]["content"]["text"]
                                for e in events if e["type"] == "content-delta")
    assert s["billed"] == events[-1]["delta"]["usage"]["billed_units"]


@pytest.mark.parametrize("call", [c for c in CALLS if c.coding], ids=lambda c: c.key)
def test_content_encoding(run: Run, call: Call) -> None:
    """The provider compresses: the sidecar meters the decoded copy, the app gets the
    compressed bytes exactly as sent, and they decode to the recorded body."""
    res = run.apps["httpx"]["results"][call.key]
    assert ("content-encoding", call.coding) in [tuple(h) for h in res["headers"]]
    raw = base64.b64decode(res["raw_b64"])
    assert raw == call.sent
    recorded = payload(f"{call.stem}.response.{'sse' if call.stream else 'json'}")
    assert decode(str(call.coding), raw) == recorded
    assert run.records[call.key]["tokens"] == call.exp["tokens"]


@pytest.mark.parametrize("call", [c for c in CALLS if c.http2], ids=lambda c: c.key)
def test_http2(run: Run, call: Call) -> None:
    res = run.apps["httpx"]["results"][call.key]
    # app <-> sidecar: h2 whenever the app offers it, in any order: the sidecar connects
    # upstream first (eager) and offers the app the protocol the provider chose.
    assert res["http_version"] == "HTTP/2"
    ex = run.upstream(call)
    assert (ex.alpn, ex.http_version) == ("h2", "2")  # sidecar <-> provider
    rec = run.records[call.key]
    assert rec["tokens"] == call.exp["tokens"] and rec["usage_injected"] is call.injected


def test_http1_apps_stay_on_http1(run: Run) -> None:
    """The sidecar keeps the protocol the app chose: HTTP/1.1 apps reach the (h2-capable)
    provider over HTTP/1.1."""
    for call in CALLS:
        if call.plain or call.http2:
            continue
        ex = run.upstream(call)
        assert (ex.alpn, ex.http_version) == ("http/1.1", "1.1"), call.key
        if call.app == "httpx":
            assert run.apps["httpx"]["results"][call.key]["http_version"] == "HTTP/1.1"


def test_no_secret_in_sidecar_output(e2e: E2E, run: Run) -> None:
    outputs = {"stdout": e2e.sidecar_out.read_text(), "stderr": e2e.stderr(),
               "metrics": "".join(e2e.scrapes)}
    for where, text in outputs.items():
        for secret in (*KEYS.values(), AWS_ENV["AWS_SECRET_ACCESS_KEY"]):
            assert secret not in text, f"{secret!r} leaked into the sidecar's {where}"
    assert "ERROR" not in e2e.stderr(), e2e.stderr()


def test_payloads_are_the_recorded_ones() -> None:
    """The provider's bodies are the recordings, cut into parts and nothing else."""
    for call in CALLS:
        if call.coding:
            continue
        if call.content_type.startswith("application/vnd.amazon.eventstream"):
            recorded = base64.b64decode(
                (DATA / f"{call.stem}.response.eventstream.b64").read_text())
        else:
            suffix = {SSE: "sse", NDJSON: "ndjson"}.get(call.content_type, "json")
            recorded = payload(f"{call.stem}.response.{suffix}")
        assert call.sent == recorded, call.key
    assert len(BY_KEY) == len(CALLS)
    assert {c.rid_header for c in CALLS} <= {"x-request-id", "x-amzn-requestid"}


def test_paths_are_those_of_the_recordings() -> None:
    """The SDKs' paths (what the provider routes on) are those the recordings were made
    on, ?case= aside; the Azure host and api-versions are this test's own."""
    for call in CALLS:
        exp = call.exp
        path = call.path.split("?case=", 1)[0].split("&case=", 1)[0]
        if call.provider == exp["provider"] and call.provider not in ("azure.ai.openai",
                                                                     "ollama"):
            assert path == exp["path"], call.key
