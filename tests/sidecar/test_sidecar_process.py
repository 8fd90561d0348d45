"""The sidecar as a real process (explicit-proxy mode) in front of a real HTTPS fake provider,
driven by the official SDKs and by raw httpx: exact metrics, records, byte-identical
content, and every fault of the issue with an intact client response.

The netns end-to-end test covers transparent mode; this one is fast and needs no root.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from support.fake_provider import FakeProvider, Script, WaitFor, make_provider_tls, split_sse
from support.payloads import without_usage
from support.sidecar import SidecarProcess, base_env, free_port, select, sidecar_argv, total

from podtally.certs import generate_ca

DATA = Path(__file__).parent.parent / "providers" / "testdata"
SECRET = "sk-test-SECRET-4242"
IDENTITY = {
    "POD_NAMESPACE": "payments",
    "POD_NAME": "checkout-7d9f-abcde",
    "POD_SERVICE_ACCOUNT": "checkout-sa",
    "PODTALLY_WORKLOAD": "checkout",
}


def payload(name: str) -> bytes:
    return (DATA / name).read_bytes()


def expected(case: str) -> dict[str, Any]:
    return json.loads((DATA / f"{case}.expected.json").read_text())


def sse(name: str, **kw: Any) -> Script:
    return Script.sse(split_sse(payload(name)), **kw)


def body_json(name: str, status: int = 200) -> Script:
    return Script(status=status, headers=[("content-type", "application/json"),
                                          ("x-request-id", "req_abc123")], body=payload(name))


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        ca, key = generate_ca("podtally test namespace CA")
        self.ca = tmp / "ca.pem"
        self.ca.write_bytes(ca)
        self.ca_key = tmp / "ca.key"
        self.ca_key.write_bytes(key)
        self.labels = tmp / "labels"
        self.labels.write_text('app.kubernetes.io/name="checkout"\nteam="payments-team"\n')
        # Two providers on two loopback addresses; 127.0.0.2 has no name, so it is an LLM
        # host by address (as an in-cluster gateway's IP would be).
        self.tls = make_provider_tls(tmp / "provider", ip_addresses=("127.0.0.1", "127.0.0.2"))
        self.provider = FakeProvider({}, cert=self.tls.cert, key=self.tls.key).start()
        self.anthropic = FakeProvider({}, cert=self.tls.cert, key=self.tls.key,
                                      listen="127.0.0.2:0").start()

    def start_sidecar(self, *extra: str) -> SidecarProcess:
        port, metrics_port = free_port(), free_port()
        argv = sidecar_argv(
            "--ca-cert", str(self.ca), "--ca-key", str(self.ca_key), "--mode", "regular",
            "--listen-host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics_port), "--labels-file", str(self.labels),
            "--upstream-ca-bundle", str(self.tls.ca_cert),
            "--llm-host", "localhost=openai", "--llm-host", "127.0.0.2=anthropic",
            *extra,
        )
        sc = SidecarProcess(argv, env=base_env(**IDENTITY),
                            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")
        sc.proxy_port = port
        sc.wait_ready()
        return sc

    def http(self, sc: SidecarProcess, **kw: Any) -> httpx.Client:
        return httpx.Client(proxy=f"http://127.0.0.1:{sc.proxy_port}",
                            verify=ssl.create_default_context(cafile=str(self.ca)), timeout=15, **kw)

    @property
    def openai_url(self) -> str:
        return f"https://localhost:{self.provider.port}/v1"

    @property
    def anthropic_url(self) -> str:
        return f"https://127.0.0.2:{self.anthropic.port}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("sidecar"))
    try:
        yield e
    finally:
        e.provider.stop()
        e.anthropic.stop()


@pytest.fixture(scope="module")
def sidecar(env: Env) -> Iterator[SidecarProcess]:
    sc = env.start_sidecar()
    yield sc
    exposition = sc.metrics()  # the last scrape: lets the drain end at once
    assert sc.terminate() == 0
    # No secret ever reaches the records, the logs or the metrics.
    everything = "".join(sc.stdout_lines) + sc.stderr + repr(exposition)
    assert "podtally_llm_requests_total" in everything
    assert SECRET not in everything


def route(env: Env, path: str, script: Script | list[Script]) -> None:
    (env.anthropic if path == "/v1/messages" else env.provider).set_route("POST", path, script)


def call_records(sc: SidecarProcess, before: int, n: int = 1) -> list[dict[str, Any]]:
    return sc.wait_records(before + n)[before:]


def tokens_of(sc: SidecarProcess, model: str) -> dict[str, float]:
    m = sc.metrics()
    return {dict(lbl)["token_type"]: v for lbl, v in select(m, "podtally_llm_tokens_total", model=model).items()}


def test_openai_chat_through_the_sdk(env: Env, sidecar: SidecarProcess) -> None:
    route(env, "/v1/chat/completions", body_json("openai-chat.response.json"))
    before = len(sidecar.records)
    client = openai.OpenAI(base_url=env.openai_url, api_key=SECRET, http_client=env.http(sidecar))
    got = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert got.http_response.content == payload("openai-chat.response.json")

    (rec,) = call_records(sidecar, before)
    exp = expected("openai-chat")
    assert rec["tokens"] == exp["tokens"]
    assert (rec["provider"], rec["model"], rec["operation"], rec["status"]) == (
        "openai", exp["model"], "chat", "200")
    assert rec["request_id"] == "req_abc123"
    assert rec["namespace"] == "payments" and rec["workload"] == "checkout"
    assert rec["team"] == "payments-team" and rec["app"] == "checkout"
    assert rec["service_account"] == "checkout-sa" and rec["pod"] == "checkout-7d9f-abcde"
    assert rec["streamed"] is False and rec["time_to_first_token_seconds"] is None
    assert tokens_of(sidecar, exp["model"]) == {k: float(v) for k, v in exp["tokens"].items()}
    m = sidecar.metrics()
    assert total(m, "podtally_llm_requests_total", model=exp["model"], code="200",
                 operation="chat", namespace="payments", workload="checkout",
                 team="payments-team", app="checkout", service_account="checkout-sa") == 1




def test_openai_stream_gets_usage_without_the_client_seeing_it(env: Env, sidecar: SidecarProcess) -> None:
    name = "openai-chat-stream-usage.response.sse"
    route(env, "/v1/chat/completions", sse(name))
    before = len(sidecar.records)
    with env.http(sidecar) as http, http.stream(
        "POST", f"{env.openai_url}/chat/completions",
        headers={"authorization": f"Bearer {SECRET}"},
        json={"model": "gpt-4o-mini", "stream": True, "messages": []},
    ) as resp:
        raw = b"".join(resp.iter_raw())
    assert raw == without_usage(payload(name))
    upstream = env.provider.requests[-1].json()
    assert upstream["stream_options"] == {"include_usage": True}

    (rec,) = call_records(sidecar, before)
    assert rec["tokens"] == expected("openai-chat-stream-usage")["tokens"]
    assert rec["usage_injected"] is True and rec["streamed"] is True
    assert rec["time_to_first_token_seconds"] is not None
    assert 0 <= rec["time_to_first_token_seconds"] <= rec["duration_seconds"]


def test_openai_sdk_streamwithout_usage(env: Env, sidecar: SidecarProcess) -> None:
    route(env, "/v1/chat/completions", sse("openai-chat-stream-usage.response.sse"))
    before = len(sidecar.records)
    client = openai.OpenAI(base_url=env.openai_url, api_key=SECRET, http_client=env.http(sidecar))
    chunks = list(client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    (rec,) = call_records(sidecar, before)
    assert rec["tokens"]["input"] == 78 and rec["tokens"]["output"] == 9


def test_client_that_asked_for_usage_gets_it(env: Env, sidecar: SidecarProcess) -> None:
    name = "openai-chat-stream-usage.response.sse"
    route(env, "/v1/chat/completions", sse(name))
    before = len(sidecar.records)
    req = json.dumps({"model": "gpt-4o-mini", "stream": True,
                      "stream_options": {"include_usage": True}}).encode()
    with env.http(sidecar) as http, http.stream("POST", f"{env.openai_url}/chat/completions", content=req) as r:
        raw = b"".join(r.iter_raw())
    assert raw == payload(name)
    assert env.provider.requests[-1].body == req
    (rec,) = call_records(sidecar, before)
    assert rec["usage_injected"] is False and rec["tokens"]["output"] == 9


@pytest.mark.parametrize("case", ["anthropic-cache-read-stream", "anthropic-iterations-stream",
                                  "anthropic-messages", "anthropic-cache"])
def test_anthropic_exact(env: Env, sidecar: SidecarProcess, case: str) -> None:
    streamed = (DATA / f"{case}.response.sse").exists()
    script = sse(f"{case}.response.sse") if streamed else body_json(f"{case}.response.json")
    route(env, "/v1/messages", script)
    before = len(sidecar.records)
    client = anthropic.Anthropic(base_url=env.anthropic_url, api_key=SECRET, http_client=env.http(sidecar))
    if streamed:
        with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64,
                                    messages=[{"role": "user", "content": "hi"}]) as s:
            s.until_done()
    else:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=64,
                               messages=[{"role": "user", "content": "hi"}])
    (rec,) = call_records(sidecar, before)
    exp = expected(case)
    assert rec["tokens"] == exp["tokens"]
    assert rec["model"] == exp["model"] and rec["provider"] == "anthropic"
    assert rec["service_tier"] == exp["service_tier"]
    assert env.anthropic.requests[-1].header("x-api-key") == SECRET  # the app's key still goes upstream


def test_no_inject_option_leaves_the_request_alone(env: Env) -> None:
    sc = env.start_sidecar("--no-inject-stream-usage", "--drain-timeout", "1")
    try:
        route(env, "/v1/chat/completions", sse("openai-chat-stream-no-usage.response.sse"))
        req = json.dumps({"model": "gpt-4o-mini", "stream": True}).encode()
        with env.http(sc) as http, http.stream("POST", f"{env.openai_url}/chat/completions", content=req) as r:
            raw = b"".join(r.iter_raw())
        assert raw == payload("openai-chat-stream-no-usage.response.sse")
        assert env.provider.requests[-1].body == req
        (rec,) = sc.wait_records(1)
        assert rec["tokens"] is None and rec["status"] == "200" and rec["usage_injected"] is False
        m = sc.metrics()
        assert total(m, "podtally_llm_requests_total", code="200") == 1
        assert total(m, "podtally_llm_tokens_total") == 0
    finally:
        sc.metrics()
        assert sc.terminate() == 0


# -- faults: each gives a request count, whatever usage is known, an intact client response --


def test_malformed_json_is_counted_and_passed_through(env: Env, sidecar: SidecarProcess) -> None:
    broken = b'{"id": "chatcmpl-x", "model": "gpt-4o-mini-2024-07-18", "usage": {"prompt_tok'
    route(env, "/v1/chat/completions", Script(headers=[("content-type", "application/json")], body=broken))
    before = len(sidecar.records)
    with env.http(sidecar) as http:
        r = http.post(f"{env.openai_url}/chat/completions", json={"model": "gpt-4o-mini"})
    assert r.content == broken
    (rec,) = call_records(sidecar, before)
    assert rec["status"] == "200" and rec["tokens"] is None
    assert rec["model"] == "gpt-4o-mini"  # the request's: the response could not be read
    assert rec["error"]


def test_upstream_429_and_500(env: Env, sidecar: SidecarProcess) -> None:
    err = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}
    for status in (429, 500):
        route(env, "/v1/chat/completions", Script.json(err, status=status))
        before = len(sidecar.records)
        with env.http(sidecar) as http:
            r = http.post(f"{env.openai_url}/chat/completions", json={"model": "gpt-4o-mini"})
        assert r.status_code == status and r.json() == err
        (rec,) = call_records(sidecar, before)
        assert rec["status"] == str(status) and rec["tokens"] is None
    m = sidecar.metrics()
    assert total(m, "podtally_llm_requests_total", code="429", model="gpt-4o-mini") == 1
    assert total(m, "podtally_llm_requests_total", code="500", model="gpt-4o-mini") == 1


def test_truncated_stream_keeps_what_was_known(env: Env, sidecar: SidecarProcess) -> None:
    events = split_sse(payload("anthropic-cache-read-stream.response.sse"))
    route(env, "/v1/messages", Script.sse(events, close_after=3))
    before = len(sidecar.records)
    with env.http(sidecar) as http, pytest.raises(httpx.HTTPError), http.stream(
        "POST", f"{env.anthropic_url}/v1/messages", json={"model": "claude-3-5-sonnet", "stream": True}
    ) as r:
        got = b""
        for part in r.iter_raw():
            got += part
    (rec,) = call_records(sidecar, before)
    assert rec["status"] == "200" and rec["error"]
    # message_start arrived: its input counts are known, output as of then.
    assert rec["tokens"]["cache_read"] == expected("anthropic-cache-read-stream")["tokens"]["cache_read"]


def test_client_disconnect_mid_stream(env: Env, sidecar: SidecarProcess) -> None:
    release = env.tmp / "never"
    events = split_sse(payload("openai-chat-stream-usage.response.sse"))
    route(env, "/v1/chat/completions", Script.sse([*events[:2], WaitFor(file=release, timeout=5), *events[2:]]))
    before = len(sidecar.records)
    with env.http(sidecar) as http, http.stream(
        "POST", f"{env.openai_url}/chat/completions", json={"model": "gpt-4o-mini", "stream": True}
    ) as r:
        first = next(r.iter_raw())
        assert first.startswith(b"data: ")
    (rec,) = call_records(sidecar, before)
    assert rec["error"] == "client disconnected"
    assert rec["status"] == "200" and rec["model"] == "gpt-4o-mini-2024-07-18"


def test_upstream_connection_refused(env: Env, sidecar: SidecarProcess) -> None:
    before = len(sidecar.records)
    with env.http(sidecar) as http:
        r = http.post(f"https://localhost:{free_port()}/v1/chat/completions", json={"model": "gpt-4o-mini"})
    assert r.status_code == 502  # mitmproxy's answer: the app sees an error, as it would directly
    (rec,) = call_records(sidecar, before)
    assert rec["status"] == "error" and rec["error"] == "upstream error"
    assert total(sidecar.metrics(), "podtally_llm_requests_total", code="error") >= 1


def test_non_llm_tls_is_not_decrypted(env: Env, sidecar: SidecarProcess) -> None:
    env.provider.set_route("GET", "/plain", Script.json({"ok": True}))
    before = len(sidecar.records)
    # 127.0.0.1 is not an LLM host: the app must see the provider's own certificate, so a
    # client trusting only the provider CA succeeds through the proxy.
    with httpx.Client(proxy=f"http://127.0.0.1:{sidecar.proxy_port}", verify=env.tls.client_context()) as http:
        assert http.get(f"https://127.0.0.1:{env.provider.port}/plain").json() == {"ok": True}
    with httpx.Client(proxy=f"http://127.0.0.1:{sidecar.proxy_port}", verify=ssl.create_default_context(cafile=str(env.ca))) as http, \
            pytest.raises(httpx.ConnectError):
        http.get(f"https://127.0.0.1:{env.provider.port}/plain")
    time.sleep(0.2)
    assert len(sidecar.records) == before


def test_unmetered_llm_paths_pass_through(env: Env, sidecar: SidecarProcess) -> None:
    env.provider.set_route("GET", "/v1/models", Script.json({"data": []}))
    before = len(sidecar.records)
    with env.http(sidecar) as http:
        assert http.get(f"{env.openai_url}/models").json() == {"data": []}
    time.sleep(0.2)
    assert len(sidecar.records) == before


# -- shutdown: a short-lived pod loses nothing --


def test_sigterm_waits_for_a_scrape_after_the_last_call(env: Env) -> None:
    sc = env.start_sidecar("--drain-timeout", "20")
    route(env, "/v1/chat/completions", body_json("openai-chat.response.json"))
    with env.http(sc) as http:
        http.post(f"{env.openai_url}/chat/completions", json={"model": "gpt-4o"})
    sc.wait_records(1)
    sc.proc.send_signal(15)
    time.sleep(1.0)
    assert sc.proc.poll() is None, "exited before its metrics were scraped"
    first = sc.scrape()  # exposes the zeros; the call is applied right after
    assert sc.proc.poll() is None
    second = sc.scrape()
    assert sc.proc.wait(5) == 0
    assert 'podtally_llm_requests_total{' in first
    from support.sidecar import parse_metrics
    assert total(parse_metrics(first), "podtally_llm_requests_total") == 0
    assert total(parse_metrics(second), "podtally_llm_requests_total") == 1


def test_sigterm_with_nothing_to_report_exits_at_once(env: Env) -> None:
    sc = env.start_sidecar()
    start = time.monotonic()
    assert sc.terminate(timeout=5) == 0
    assert time.monotonic() - start < 3


def test_sigterm_finishes_an_inflight_stream(env: Env) -> None:
    sc = env.start_sidecar("--drain-timeout", "2")
    release = env.tmp / "release-drain"
    events = split_sse(payload("openai-chat-stream-usage.response.sse"))
    route(env, "/v1/chat/completions", Script.sse([*events[:2], WaitFor(file=release), *events[2:]]))
    with env.http(sc) as http, http.stream(
        "POST", f"{env.openai_url}/chat/completions",
        json={"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        it = r.iter_raw()
        got = next(it)
        sc.proc.send_signal(15)
        time.sleep(0.3)
        assert sc.proc.poll() is None
        release.touch()
        got += b"".join(it)
    assert got == payload("openai-chat-stream-usage.response.sse")
    (rec,) = sc.wait_records(1)
    assert rec["tokens"]["output"] == 9 and rec["error"] is None
    assert sc.proc.wait(10) == 0  # nobody scrapes: the drain timeout bounds the wait


# -- pricing: unknown models are counted at 0 and visible; overrides and tiers apply --


def _chat_body(model: str, tier: str | None = None) -> bytes:
    body = json.loads(payload("openai-chat.response.json"))
    body["model"] = model
    if tier:
        body["service_tier"] = tier
    return json.dumps(body).encode()


def test_unknown_model_is_counted_unpriced(env: Env, sidecar: SidecarProcess) -> None:
    route(env, "/v1/chat/completions", Script(headers=[("content-type", "application/json")],
                                              body=_chat_body("acme-private-llm-7b")))
    before = len(sidecar.records)
    with env.http(sidecar) as http:
        http.post(f"{env.openai_url}/chat/completions", json={"model": "acme-private-llm-7b"})
    (rec,) = call_records(sidecar, before)
    assert rec["priced"] is False and rec["cost_usd"] == 0 and rec["tokens_total"] > 0
    m = sidecar.metrics()
    assert total(m, "podtally_llm_unpriced_requests_total", model="acme-private-llm-7b") == 1
    assert total(m, "podtally_llm_cost_usd_total", model="acme-private-llm-7b") == 0


def test_flex_tier_is_priced_at_the_flex_price(env: Env, sidecar: SidecarProcess) -> None:
    from podtally.pricing import PriceBook

    route(env, "/v1/chat/completions", Script(headers=[("content-type", "application/json")],
                                              body=_chat_body("o3-2025-04-16", tier="flex")))
    before = len(sidecar.records)
    with env.http(sidecar) as http:
        http.post(f"{env.openai_url}/chat/completions", json={"model": "o3", "service_tier": "flex"})
    (rec,) = call_records(sidecar, before)
    book = PriceBook()
    standard = book.price("openai", "o3-2025-04-16", rec["tokens"]).cost_usd
    flex = book.price("openai", "o3-2025-04-16", rec["tokens"], "flex")
    assert rec["service_tier"] == "flex" and rec["price_tier"] == flex.applied_tier != "standard"
    assert rec["cost_usd"] == pytest.approx(flex.cost_usd) and flex.cost_usd < standard


def test_price_overrides_file(env: Env) -> None:
    overrides = env.tmp / "prices.yaml"
    overrides.write_text(
        "models:\n"
        "  - provider: openai\n"
        "    model: acme-*\n"
        "    usd_per_mtok: {input: 1000000, output: 2000000}\n"
    )
    sc = env.start_sidecar("--price-overrides", str(overrides))
    try:
        route(env, "/v1/chat/completions", Script(headers=[("content-type", "application/json")],
                                                  body=_chat_body("acme-private-llm-7b")))
        with env.http(sc) as http:
            http.post(f"{env.openai_url}/chat/completions", json={"model": "acme-private-llm-7b"})
        (rec,) = sc.wait_records(1)
        t = rec["tokens"]
        assert rec["priced"] is True
        assert rec["cost_usd"] == pytest.approx((t["input"] + t["cache_read"]) * 1 + t["output"] * 2)
    finally:
        sc.metrics()
        assert sc.terminate() == 0


def test_bad_overrides_file_is_a_clear_startup_error(env: Env) -> None:
    bad = env.tmp / "bad-prices.yaml"
    bad.write_text("models:\n  - provider: openai\n    usd_per_mtok: {input: -1}\n")
    import subprocess

    proc = subprocess.run(
        sidecar_argv("--ca-cert", str(env.ca), "--ca-key", str(env.ca_key), "--mode", "regular",
                     "--port", str(free_port()), "--metrics-port", str(free_port()),
                     "--price-overrides", str(bad)),
        capture_output=True, text=True, timeout=30, env=base_env(),
    )
    assert proc.returncode != 0
    assert "bad-prices.yaml" in proc.stderr and "Traceback" not in proc.stderr
