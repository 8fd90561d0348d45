"""End to end: a pod played by a network namespace, metered by the real sidecar (needs root).

Layout (tests/support/netns.py)::

    pod netns                                               provider netns
      init: `podtally init-iptables` (root)                   fake provider (root), 0.0.0.0:443
      sidecar: `podtally sidecar` (uid 1337) :15001 :15090      and [::]:443, cert from a
      app: official openai / anthropic SDKs (uid 1000),         provider CA, real recorded
           default base URLs, SSL_CERT_FILE = podtally CA        payloads, request log

The app's /etc/hosts maps api.openai.com, api.anthropic.com and example.test to the
provider; iptables sends the app's connections to the sidecar, which decrypts the LLM hosts
with leaf certs from the podtally CA, verifies the provider against --upstream-ca-bundle and
meters. Prometheus' view is taken the way Prometheus takes it: from outside the pod (the
provider netns), at the pod address. Zero first: a call on never-scraped series shows up at
0 on the next scrape and counts from the one after.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from support.e2e_pod import (
    E2E,
    ID_LABELS,
    POD_ENV,
    PROXY_UID,
    TOKEN_TYPES,
    metered_pod,
)
from support.e2e_pod import value as _value
from support.fake_provider import read_request_log, split_sse
from support.netns import POD_ADDR, POD_ADDR6, PROVIDER_ADDR, PROVIDER_ADDR6
from support.payloads import without_usage
from support.sidecar import Sample, select

from podtally.pricing import PriceBook

pytestmark = pytest.mark.netns

DATA = Path(__file__).parent / "providers" / "testdata"

OPENAI_KEY = "sk-test-SECRET-123"
ANTHROPIC_KEY = "sk-ant-test-SECRET-456"
SECRETS = (OPENAI_KEY, ANTHROPIC_KEY)


def payload(name: str) -> bytes:
    return (DATA / name).read_bytes()


def expected(stem: str) -> dict[str, Any]:
    return dict(json.loads((DATA / f"{stem}.expected.json").read_text()))


# ------------------------------------------------------------------------------ the calls


@dataclass(frozen=True)
class Case:
    """One LLM call of the SDK app and the recorded payload the provider answers it with."""

    key: str
    stem: str  # tests/providers/testdata/<stem>.*
    provider: str
    host: str
    path: str  # the query tells the fake provider's routes apart (same API path)
    stream: bool
    request_model: str
    request_id: str

    @property
    def response_file(self) -> str:
        return f"{self.stem}.response.{'sse' if self.stream else 'json'}"

    @property
    def sent(self) -> bytes:
        """The provider's response body."""
        return payload(self.response_file)

    @property
    def usage_injected(self) -> bool:
        return self.provider == "openai" and self.stream

    @property
    def at_client(self) -> bytes:
        """What the app must get: the provider's bytes, minus what include_usage added."""
        return without_usage(self.sent) if self.usage_injected else self.sent

    @property
    def model(self) -> str:
        return str(expected(self.stem)["model"])

    @property
    def response_id(self) -> str:
        if not self.stream:
            return str(json.loads(self.sent)["id"])
        first = json.loads(split_sse(self.sent)[0].split(b"data: ", 1)[1])
        return str(first["id"] if self.provider == "openai" else first["message"]["id"])


SDK_CASES = (
    Case("openai-chat", "openai-chat", "openai", "api.openai.com",
         "/v1/chat/completions?case=chat", False, "gpt-4o", "req_e2e_openai_chat"),
    Case("openai-stream", "openai-chat-stream-usage", "openai", "api.openai.com",
         "/v1/chat/completions?case=stream", True, "gpt-4o-mini", "req_e2e_openai_stream"),
    Case("anthropic-chat", "anthropic-messages", "anthropic", "api.anthropic.com",
         "/v1/messages?case=chat", False, "claude-3-opus-latest", "req_e2e_anthropic_chat"),
    Case("anthropic-stream", "anthropic-cache-read-stream", "anthropic", "api.anthropic.com",
         "/v1/messages?case=stream", True, "claude-3-5-sonnet-20240620",
         "req_e2e_anthropic_stream"),
)
SDK = {c.key: c for c in SDK_CASES}


@dataclass(frozen=True)
class Held:
    """A stream the provider holds after `head` events until the app creates `release`."""

    key: str
    stem: str
    provider: str
    url: str
    head: int  # events sent before the hold (the first one carries output)
    request: dict[str, Any]

    @property
    def path(self) -> str:
        return "/" + self.url.split("://", 1)[1].split("/", 1)[1]

    @property
    def events(self) -> list[bytes]:
        return split_sse(payload(f"{self.stem}.response.sse"))

    @property
    def usage_injected(self) -> bool:
        return self.provider == "openai"

    def at_client(self, data: bytes) -> bytes:
        return without_usage(data) if self.usage_injected else data


HELD_CASES = (
    # A plain stream: the sidecar only reads along.
    Held("anthropic-held", "anthropic-messages-stream", "anthropic",
         "https://api.anthropic.com/v1/messages?case=held", 4,
         {"model": "claude-3-5-haiku-latest", "max_tokens": 64, "stream": True,
          "messages": [{"role": "user", "content": "Two names for a pet pelican"}]}),
    # A stream the sidecar rewrites (include_usage injected, usage members stripped).
    Held("openai-held", "openai-completions-stream", "openai",
         "https://api.openai.com/v1/completions?case=held", 2,
         {"model": "gpt-3.5-turbo-instruct", "stream": True,
          "prompt": "Tell me a story about building the best SDK!"}),
)
LATE_END_PATH = "/v1/chat/completions?case=late-end"
HOLD_SECONDS = 0.6  # how long the app keeps the provider waiting after the head arrived


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _chunked_response(headers: list[tuple[str, str]], chunks: list[bytes]) -> bytes:
    head = "HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    return head.encode() + body + b"0\r\n\r\n"


def routes_spec(release_dir: Path) -> dict[str, Any]:
    routes: list[dict[str, Any]] = []
    for c in SDK_CASES:
        rid = "x-request-id" if c.provider == "openai" else "request-id"
        method, path = "POST", c.path
        if c.key == "openai-stream":
            # The stream's end travels with its last event (one write): the OpenAI SDK stops
            # reading at `data: [DONE]` and closes (test_openai_sdk_closing_at_done_is_not_a_disconnect).
            hdrs = [("content-type", "text/event-stream"), ("cache-control", "no-cache"),
                    (rid, c.request_id), ("transfer-encoding", "chunked"),
                    ("connection", "close")]
            routes.append({"method": method, "path": path,
                           "raw_b64": _b64(_chunked_response(hdrs, split_sse(c.sent)))})
        elif c.stream:
            routes.append({
                "method": method, "path": path, "chunked": True,
                "headers": [["content-type", "text/event-stream"], ["cache-control", "no-cache"],
                            [rid, c.request_id]],
                # One HTTP chunk per SSE event, paced: the sidecar sees a real stream.
                "body": [{"file": str(DATA / c.response_file), "split_sse": True,
                          "delay": 0.003}],
            })
        else:
            routes.append({
                "method": method, "path": path,
                "headers": [["content-type", "application/json"], [rid, c.request_id]],
                "body": [{"file": str(DATA / c.response_file)}],
            })
    for h in HELD_CASES:
        events = h.events
        routes.append({
            "method": "POST", "path": h.path,
            "chunked": True,
            "headers": [["content-type", "text/event-stream"]],
            "body": [{"data_b64": _b64(e)} for e in events[: h.head]]
            + [{"wait_for_file": str(release_dir / h.key), "timeout": 15}]
            + [{"data_b64": _b64(e), "delay": 0.002} for e in events[h.head :]],
        })
    # The end of the stream (the zero-length chunk) comes 0.5 s after `data: [DONE]`.
    routes.append({
        "method": "POST", "path": LATE_END_PATH, "chunked": True,
        "headers": [["content-type", "text/event-stream"]],
        "body": [{"file": str(DATA / "openai-chat-stream-usage.response.sse"),
                  "split_sse": True}, {"data": "", "delay": 0.5}],
    })
    routes += [
        {"method": "GET", "path": "/v1/models", "json": {"object": "list", "data": []}},
        {"method": "GET", "path": "/plain", "json": {"ok": True}},
    ]
    return {"routes": routes}


# ---------------------------------------------------------------------------- the apps

# The app: official SDKs, default clients and base URLs (SSL_CERT_FILE is the only knob).
# httpx event hooks (the SDKs' documented DefaultHttpxClient) tee each request body and the
# raw response bytes as read off the connection, so the test compares them byte for byte.
SDK_APP = r"""
import base64, json, sys
import anthropic, httpx, openai

exchanges = []

def on_request(request):
    exchanges.append({"method": request.method, "url": str(request.url),
                      "request_b64": base64.b64encode(request.content).decode(), "chunks": []})

def on_response(response):
    entry = exchanges[-1]
    entry["status"] = response.status_code
    inner = response.stream

    class Tee(httpx.SyncByteStream):
        def __iter__(self):
            for chunk in inner:
                entry["chunks"].append(chunk)
                yield chunk

        def close(self):
            inner.close()

    response.stream = Tee()

hooks = {"request": [on_request], "response": [on_response]}
oa = openai.OpenAI(max_retries=0, http_client=openai.DefaultHttpxClient(event_hooks=hooks))
an = anthropic.Anthropic(max_retries=0,
                         http_client=anthropic.DefaultHttpxClient(event_hooks=hooks))
out = {"base_urls": [str(oa.base_url), str(an.base_url)], "results": {}}
res = out["results"]

c = oa.chat.completions.create(model="gpt-4o", extra_query={"case": "chat"},
                               messages=[{"role": "user", "content": "Hello! How are you doing?"}])
res["openai-chat"] = {"model": c.model, "content": c.choices[0].message.content,
                      "usage": c.usage.model_dump()}

chunks = list(oa.chat.completions.create(
    model="gpt-4o-mini", stream=True, extra_query={"case": "stream"},
    messages=[{"role": "user", "content": "What is the capital of the UK?"}]))
res["openai-stream"] = {
    "model": chunks[0].model,
    "content": "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices),
    "chunks": len(chunks),
    "usage_seen": sum(ch.usage is not None for ch in chunks),
    "empty_choices": sum(not ch.choices for ch in chunks),
}

m = an.messages.create(model="claude-3-opus-latest", max_tokens=64, extra_query={"case": "chat"},
                       messages=[{"role": "user", "content": "What is the capital of France?"}])
res["anthropic-chat"] = {"model": m.model, "content": m.content[0].text,
                         "usage": m.usage.model_dump()}

with an.messages.stream(model="claude-3-5-sonnet-20240620", max_tokens=1024,
                        extra_query={"case": "stream"},
                        messages=[{"role": "user", "content": "Summarise this article."}]) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
res["anthropic-stream"] = {"model": final.model, "content": text,
                           "usage": final.usage.model_dump()}

for e in exchanges:
    e["response_b64"] = base64.b64encode(b"".join(e.pop("chunks"))).decode()
out["exchanges"] = exchanges
print(json.dumps(out))
"""

# A raw httpx POST, read as a stream: reads the first `head_len` bytes, notes when they
# arrived, keeps a held provider waiting `hold` s more, releases it and reads the rest.
RAW_APP = r"""
import base64, json, sys, time
import httpx

spec = json.loads(sys.argv[1])
out = {"t_head": None, "t_release": None}
got = b""
try:
    with httpx.Client(timeout=30) as client:
        out["t_request"] = time.monotonic()
        with client.stream("POST", spec["url"], headers=spec["headers"],
                           content=spec["body"].encode()) as r:
            out["status"] = r.status_code
            it = r.iter_raw()
            for piece in it:
                got += piece
                if len(got) >= spec["head_len"]:
                    break
            out["t_head"] = time.monotonic()
            out["head_b64"] = base64.b64encode(got).decode()
            time.sleep(spec["hold"])
            out["t_release"] = time.monotonic()  # the provider cannot resume before this
            open(spec["release"], "w").close()
            for piece in it:
                got += piece
except httpx.HTTPError as exc:
    out["error"] = repr(exc)
out["t_end"] = time.monotonic()
out["body_b64"] = base64.b64encode(got).decode()
print(json.dumps(out))
"""

# The OpenAI SDK's stream, as any app iterates it: the SDK stops at `data: [DONE]` and
# closes the response without waiting for the end of the chunked body.
LATE_END_APP = r"""
import json
import openai

client = openai.OpenAI(max_retries=0)
chunks = list(client.chat.completions.create(
    model="gpt-4o-mini", stream=True, extra_query={"case": "late-end"},
    messages=[{"role": "user", "content": "What is the capital of the UK?"}]))
print(json.dumps({"chunks": len(chunks), "text": "".join(
    c.choices[0].delta.content or "" for c in chunks if c.choices)}))
"""

# A TLS connection to a non-LLM host, and (for contrast) one to an LLM host: who signed the
# certificate the app sees? Then example.test with only the podtally CA trusted must fail.
PASSTHROUGH_APP = r"""
import json, ssl, sys
import httpx

provider_ca, podtally_ca = sys.argv[1:3]

def issuer(client, url):
    with client.stream("GET", url) as r:
        sslobj = r.extensions["network_stream"].get_extra_info("ssl_object")
        cert = sslobj.getpeercert()
        r.read()
        name = dict(x[0] for x in cert["issuer"])
        return {"status": r.status_code, "body": r.json(), "issuer": name.get("commonName"),
                "san": [v for _, v in cert.get("subjectAltName", ())]}

out = {}
with httpx.Client(verify=ssl.create_default_context(cafile=provider_ca), timeout=10) as c:
    out["example"] = issuer(c, "https://example.test/plain")
with httpx.Client(timeout=10) as c:  # SSL_CERT_FILE: the podtally CA
    out["openai"] = issuer(c, "https://api.openai.com/v1/models")
try:
    with httpx.Client(verify=ssl.create_default_context(cafile=podtally_ca), timeout=10) as c:
        c.get("https://example.test/plain")
    out["example_with_podtally_ca"] = "connected"
except httpx.ConnectError as exc:
    out["example_with_podtally_ca"] = "ConnectError: " + str(exc)
print(json.dumps(out))
"""


# ------------------------------------------------------------------------------ the pod


@pytest.fixture(scope="module")
def e2e() -> Iterator[E2E]:
    hosts = {"api.openai.com": PROVIDER_ADDR, "api.anthropic.com": PROVIDER_ADDR,
             "example.test": PROVIDER_ADDR}
    with metered_pod(hosts=hosts, tls_hosts=list(hosts), routes=routes_spec,
                     app_env={"OPENAI_API_KEY": OPENAI_KEY,
                              "ANTHROPIC_API_KEY": ANTHROPIC_KEY}) as env:
        yield env


@dataclass
class SdkRun:
    out: dict[str, Any]
    records: list[dict[str, Any]]
    before: dict[Sample, float]
    first: dict[Sample, float]  # the first scrape after the calls: new series at zero
    after: dict[Sample, float]


@pytest.fixture(scope="module")
def sdk_run(e2e: E2E) -> SdkRun:
    """The app makes its four SDK calls once; records and metrics around them are kept."""
    e2e.alive()
    before = e2e.metrics()
    n = len(e2e.records())
    out = e2e.app(SDK_APP)
    records = e2e.wait_records(n + len(SDK_CASES))[n:]
    first = e2e.scrape()
    after = e2e.scrape()
    return SdkRun(out, records, before, first, after)


def _exchange_for(e2e: E2E, case: Case) -> Any:
    ex = e2e.exchanges().get(case.path)
    assert ex is not None, f"the provider never got {case.path}{e2e.diagnostics()}"
    return ex


# ------------------------------------------------------------------------------ the tests


def test_pod_is_wired_like_kubernetes(e2e: E2E) -> None:
    rules = e2e.pod.run(["iptables-save", "-t", "nat"]).stdout
    assert "-A OUTPUT -p tcp -j PODTALLY_OUTPUT" in rules
    assert f"-m owner --uid-owner {PROXY_UID} -j RETURN" in rules
    assert "-j REDIRECT --to-ports 15001" in rules
    # The sidecar is the Python process itself (ip netns exec and setpriv exec, not fork).
    status = Path(f"/proc/{e2e.sidecar.pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
    assert uids is not None and uids[1].split() == [str(PROXY_UID)] * 4
    code, body = e2e.get("/healthz")
    assert (code, body) == (200, "ok\n")


def test_sdk_sees_exactly_what_the_provider_sent(e2e: E2E, sdk_run: SdkRun) -> None:
    out = sdk_run.out
    assert out["base_urls"] == ["https://api.openai.com/v1/", "https://api.anthropic.com"]
    got = {ex["url"]: ex for ex in out["exchanges"]}
    for case in SDK_CASES:
        if case.stream:  # the provider sends the recorded stream event by event, as recorded
            assert b"".join(split_sse(case.sent)) == case.sent
        ex = got[f"https://{case.host}{case.path}"]
        assert ex["status"] == 200, case.key
        raw = base64.b64decode(ex["response_b64"])
        assert raw == case.at_client, (
            f"{case.key}: the app's bytes differ from the provider's{e2e.diagnostics()}")

    res = out["results"]
    chat = json.loads(payload("openai-chat.response.json"))
    assert res["openai-chat"]["content"] == chat["choices"][0]["message"]["content"]
    assert res["openai-chat"]["usage"]["prompt_tokens"] == chat["usage"]["prompt_tokens"]
    # The stream as the SDK parsed it: no usage chunk, no usage anywhere (never asked for).
    stream = res["openai-stream"]
    assert stream["usage_seen"] == 0 and stream["empty_choices"] == 0
    assert stream["model"] == SDK["openai-stream"].model
    events = [json.loads(e.removeprefix(b"data: ")) for e in split_sse(
        SDK["openai-stream"].sent) if e != b"data: [DONE]\n\n"]
    assert stream["chunks"] == sum(1 for e in events if e["choices"])
    assert stream["content"] == "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    msg = json.loads(payload("anthropic-messages.response.json"))
    assert res["anthropic-chat"]["content"] == msg["content"][0]["text"]
    assert res["anthropic-chat"]["usage"]["input_tokens"] == msg["usage"]["input_tokens"]
    s = res["anthropic-stream"]
    assert s["model"] == SDK["anthropic-stream"].model and s["content"]
    assert s["usage"]["cache_read_input_tokens"] == expected("anthropic-cache-read-stream")[
        "tokens"]["cache_read"]


def test_upstream_got_the_apps_requests(e2e: E2E, sdk_run: SdkRun) -> None:
    sent = {ex["url"]: base64.b64decode(ex["request_b64"]) for ex in sdk_run.out["exchanges"]}
    for case in SDK_CASES:
        ex = _exchange_for(e2e, case)
        app_body = sent[f"https://{case.host}{case.path}"]
        assert ex.sni == case.host and ex.header("host") == case.host, case.key
        assert ex.client.rsplit(":", 1)[0] == POD_ADDR  # the sidecar dials from the pod
        if case.provider == "openai":
            assert ex.header("authorization") == f"Bearer {OPENAI_KEY}"
        else:
            assert ex.header("x-api-key") == ANTHROPIC_KEY
        if case.usage_injected:
            assert "stream_options" not in json.loads(app_body)
            assert ex.json() == {**json.loads(app_body), "stream_options": {"include_usage": True}}
        else:
            assert ex.body == app_body, f"{case.key}: request body altered"
        assert ex.outcome == ("raw" if case.key == "openai-stream" else "complete"), case.key


def test_one_record_per_call(e2e: E2E, sdk_run: SdkRun) -> None:
    by_model = {r["model"]: r for r in sdk_run.records}
    assert len(sdk_run.records) == len(SDK_CASES) == len(by_model), sdk_run.records
    prices = PriceBook()
    for case in SDK_CASES:
        exp = expected(case.stem)
        rec = by_model.get(exp["model"])
        assert rec is not None, f"no record for {case.key}: {sdk_run.records}"
        assert {k: rec[k] for k in ("namespace", "workload", "team", "app",
                                    "service_account")} == ID_LABELS
        assert rec["kind"] == "podtally.llm_call" and rec["pod"] == POD_ENV["POD_NAME"]
        assert (rec["provider"], rec["host"], rec["operation"], rec["status"]) == (
            case.provider, case.host, "chat", "200"), case.key
        assert rec["request_model"] == case.request_model
        assert rec["tokens"] == exp["tokens"], case.key
        assert rec["tokens_total"] == sum(exp["tokens"].values())
        assert rec["tokens_estimated"] is False and rec["error"] is None, json.dumps(rec)
        assert rec["service_tier"] == exp["service_tier"], case.key
        assert rec["streamed"] is case.stream and rec["usage_injected"] is case.usage_injected
        assert rec["request_id"] == case.request_id
        assert rec["response_id"] == case.response_id
        if case.stream:
            assert rec["time_to_first_token_seconds"] is not None, case.key
            assert 0 <= rec["time_to_first_token_seconds"] <= rec["duration_seconds"]
        else:
            assert rec["time_to_first_token_seconds"] is None
        price = prices.price(case.provider, exp["model"], exp["tokens"], rec["service_tier"],
                             datetime.fromisoformat(rec["timestamp"]))
        assert rec["priced"] is True and rec["cost_usd"] > 0
        assert rec["cost_usd"] == pytest.approx(price.cost_usd, rel=1e-9), case.key


def test_exact_metrics(e2e: E2E, sdk_run: SdkRun) -> None:
    by_model = {r["model"]: r for r in sdk_run.records}
    for case in SDK_CASES:
        exp = expected(case.stem)
        who = {**ID_LABELS, "provider": case.provider, "model": exp["model"]}
        req = {**who, "operation": "chat", "code": "200"}
        name = "podtally_llm_requests_total"
        before = _value(sdk_run.before, name, **req)
        assert before is None, f"{case.key}: series existed before the app ran"
        # Zero first: the first scrape after the call shows the new series at 0 ...
        assert _value(sdk_run.first, name, **req) == 0, case.key
        # ... and the next one the call.
        assert _value(sdk_run.after, name, **req) == 1, case.key
        tokens = {dict(lbl)["token_type"]: v for lbl, v in
                  select(sdk_run.after, "podtally_llm_tokens_total", **who).items()}
        assert tokens == {t: float(exp["tokens"][t]) for t in TOKEN_TYPES}, case.key
        cost = _value(sdk_run.after, "podtally_llm_cost_usd_total", **who)
        assert cost is not None and cost > 0
        assert cost == pytest.approx(by_model[exp["model"]]["cost_usd"], rel=1e-9)
        assert _value(sdk_run.after, "podtally_llm_unpriced_requests_total", **who) is None
        assert _value(sdk_run.after, "podtally_llm_estimated_requests_total", **who) is None
        slim = {"namespace": "shop", "team": "payments", "provider": case.provider,
                "model": exp["model"]}
        assert _value(sdk_run.after, "podtally_llm_request_duration_seconds_count", **slim) == 1
        ttft = _value(sdk_run.after, "podtally_llm_time_to_first_token_seconds_count", **slim)
        assert ttft == (1 if case.stream else None), case.key
        # Every series of this model carries the pod's identity, nothing else.
        for (n, lbl), _ in sdk_run.after.items():
            labels = dict(lbl)
            if labels.get("model") == exp["model"] and "workload" in labels:
                assert {k: labels[k] for k in ID_LABELS} == ID_LABELS, (n, labels)
    assert sum(select(sdk_run.after, "podtally_metering_faults_total").values()) == 0


@pytest.mark.parametrize("held", HELD_CASES, ids=lambda h: h.key)
def test_first_chunk_reaches_the_app_while_the_provider_streams(e2e: E2E, held: Held) -> None:
    e2e.alive()
    events = held.events
    head = held.at_client(b"".join(events[: held.head]))
    body = json.dumps(held.request)
    headers = ({"authorization": f"Bearer {OPENAI_KEY}"} if held.provider == "openai"
               else {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"})
    headers["content-type"] = "application/json"
    release = e2e.release_dir / held.key
    release.unlink(missing_ok=True)
    n = len(e2e.records())
    before = e2e.metrics()
    spec = {"url": held.url, "headers": headers, "body": body, "head_len": len(head),
            "release": str(release), "hold": HOLD_SECONDS}
    out = e2e.app(RAW_APP, json.dumps(spec))

    ex = e2e.exchanges()[held.path]
    assert ex.outcome == "complete", (
        f"the provider gave up waiting ({ex.outcome}): the app never got the first chunk "
        f"while the provider held the stream; app: {out}{e2e.diagnostics()}")
    assert "error" not in out, out
    assert base64.b64decode(out["head_b64"]) == head
    assert base64.b64decode(out["body_b64"]) == held.at_client(b"".join(events))
    # The head reached the app before the provider sent anything after it.
    assert out["t_head"] < ex.sent_chunks_at[held.head]
    assert ex.sent_chunks_at[held.head] >= out["t_release"]
    if held.usage_injected:
        assert ex.json()["stream_options"] == {"include_usage": True}

    (rec,) = e2e.wait_records(n + 1)[n:]
    exp = expected(held.stem)
    assert rec["model"] == exp["model"] and rec["tokens"] == exp["tokens"], rec
    assert rec["error"] is None and rec["usage_injected"] is held.usage_injected
    # The first token was seen before the hold, not after it.
    ttft = rec["time_to_first_token_seconds"]
    assert ttft is not None
    assert ttft < rec["duration_seconds"] - HOLD_SECONDS * 0.8, rec
    after = e2e.metrics()
    slim = {"namespace": "shop", "team": "payments", "provider": held.provider,
            "model": exp["model"]}
    name = "podtally_llm_time_to_first_token_seconds"
    count = (_value(after, f"{name}_count", **slim) or 0) - (
        _value(before, f"{name}_count", **slim) or 0)
    total = (_value(after, f"{name}_sum", **slim) or 0) - (
        _value(before, f"{name}_sum", **slim) or 0)
    assert count == 1 and total == pytest.approx(ttft, abs=1e-6)


def test_openai_sdk_closing_at_done_is_not_a_disconnect(e2e: E2E) -> None:
    """The OpenAI SDK stops at data: [DONE] and closes before the provider's end of body
    reaches the sidecar: that is a complete call, not a client disconnect."""
    e2e.alive()
    n = len(e2e.records())
    out = e2e.app(LATE_END_APP)
    assert out["chunks"] > 0 and out["text"]
    (rec,) = e2e.wait_records(n + 1)[n:]
    assert rec["status"] == "200"
    assert rec["tokens"] == expected("openai-chat-stream-usage")["tokens"], json.dumps(rec)
    # The app got every event of the stream it asked for: nothing was cut short.
    assert rec["error"] is None, json.dumps(rec)


def test_ipv6_calls_are_captured_too(e2e: E2E) -> None:
    """The same pod over IPv6: ip6tables redirects to the sidecar's [::1]:15001."""
    e2e.alive()
    hosts = dict(e2e.pod.hosts)
    e2e.pod.set_hosts({**hosts, "api.openai.com": PROVIDER_ADDR6})
    try:
        n = len(e2e.records())
        spec = {"url": "https://api.openai.com/v1/chat/completions?case=chat",
                "headers": {"authorization": f"Bearer {OPENAI_KEY}",
                            "content-type": "application/json"},
                "body": json.dumps({"model": "gpt-4o", "messages": []}),
                "head_len": 1 << 30, "release": "/dev/null", "hold": 0}
        out = e2e.app(RAW_APP, json.dumps(spec))
    finally:
        e2e.pod.set_hosts(hosts)
    assert "error" not in out and out["status"] == 200, out
    assert base64.b64decode(out["body_b64"]) == payload("openai-chat.response.json")
    (rec,) = e2e.wait_records(n + 1)[n:]
    assert rec["tokens"] == expected("openai-chat")["tokens"] and rec["host"] == "api.openai.com"
    last = read_request_log(e2e.provider_log)[-1]
    assert last.client is not None and last.client.rsplit(":", 1)[0] == POD_ADDR6


def test_non_llm_tls_is_relayed_not_decrypted(e2e: E2E) -> None:
    e2e.alive()
    n = len(e2e.records())
    before = e2e.metrics()
    counters = e2e.nat_counters()
    out = e2e.app(PASSTHROUGH_APP, str(e2e.provider_ca), str(e2e.podtally_ca))
    time.sleep(0.3)  # a record would be written as the response ends; give it a moment

    # example.test: the app saw the provider's own certificate, end to end.
    assert out["example"]["status"] == 200 and out["example"]["body"] == {"ok": True}
    assert out["example"]["issuer"] == "podtally test provider CA"
    assert "example.test" in out["example"]["san"]
    assert out["example_with_podtally_ca"].startswith("ConnectError"), out
    assert "CERTIFICATE_VERIFY_FAILED" in out["example_with_podtally_ca"]
    # api.openai.com on the same server: decrypted, so a podtally leaf for that name only.
    assert out["openai"]["issuer"] == "podtally e2e namespace CA"
    assert "api.openai.com" in out["openai"]["san"] and "example.test" not in out["openai"]["san"]
    assert out["openai"]["body"] == {"object": "list", "data": []}

    # Those went through the sidecar (three redirected connections) ...
    after_counters = e2e.nat_counters()
    redirect = next(k for k in counters if k.startswith("PODTALLY_REDIRECT"))
    assert after_counters[redirect] - counters[redirect] == 3
    # ... and the sidecar's own upstream connections were not redirected back to itself.
    own = next(k for k in counters if f"--uid-owner {PROXY_UID}" in k)
    assert after_counters[own] - counters[own] >= 2
    plain = [ex for ex in read_request_log(e2e.provider_log) if ex.path == "/plain"]
    assert plain and all(ex.sni == "example.test" for ex in plain)

    # Nothing metered: no record, no new metric.
    assert len(e2e.records()) == n
    after = e2e.metrics()
    assert sum(select(after, "podtally_llm_requests_total").values()) == sum(
        select(before, "podtally_llm_requests_total").values())


def test_sigterm_waits_for_the_last_scrape_then_exits(e2e: E2E, sdk_run: SdkRun) -> None:
    """Runs last: the pod goes away. A call after the last scrape holds the exit until one
    more scrape has seen it; then the sidecar exits at once, with 0."""
    e2e.alive()
    case = SDK["openai-chat"]
    labels = {**ID_LABELS, "provider": "openai", "model": case.model, "operation": "chat",
              "code": "200"}
    before = e2e.metrics()
    count = _value(before, "podtally_llm_requests_total", **labels)
    assert count is not None and count >= 1  # an exposed series: the next call counts at once
    n = len(e2e.records())
    spec = {"url": f"https://api.openai.com{case.path}",
            "headers": {"authorization": f"Bearer {OPENAI_KEY}",
                        "content-type": "application/json"},
            "body": json.dumps({"model": "gpt-4o", "messages": []}),
            "head_len": 1 << 30, "release": "/dev/null", "hold": 0}
    out = e2e.app(RAW_APP, json.dumps(spec))
    assert "error" not in out and out["status"] == 200, out
    e2e.wait_records(n + 1)

    e2e.sidecar.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert e2e.sidecar.poll() is None, f"exited before its last call was scraped{e2e.diagnostics()}"
    code, _ = e2e.get("/readyz")
    assert code == 503  # draining: no longer ready
    final = e2e.scrape()
    scraped_at = time.monotonic()
    assert _value(final, "podtally_llm_requests_total", **labels) == count + 1
    try:
        rc = e2e.sidecar.wait(5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 5s after the final scrape{e2e.diagnostics()}")
    assert rc == 0, f"exit code {rc}{e2e.diagnostics()}"
    assert time.monotonic() - scraped_at < 3

    # No secret anywhere the sidecar writes or exposes.
    outputs = {"stdout": e2e.sidecar_out.read_text(), "stderr": e2e.stderr(),
               "metrics": "".join(e2e.scrapes)}
    key_body = e2e.ca_key_pem.decode().splitlines()[1]  # a line of the CA key's base64
    for where, text in outputs.items():
        for secret in (*SECRETS, key_body):
            assert secret not in text, f"{secret!r} leaked into the sidecar's {where}"
        assert "Bearer" not in text, f"an Authorization value leaked into {where}"
