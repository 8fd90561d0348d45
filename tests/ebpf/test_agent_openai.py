"""Real uprobes on a real process: the official openai SDK calls a local HTTPS fake provider
directly (no proxy, real TLS), and the agent meters it from OpenSSL's plaintext.

The agent traces only the test's cgroup, so every number below is exact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.ebpf_agent import AgentProcess, TestCgroup, libssl_of_python, running_agent
from support.fake_provider import FakeProvider, Script, make_provider_tls, split_sse
from support.sidecar import total

from podtally.pricing import PriceBook

pytestmark = pytest.mark.ebpf

DATA = Path(__file__).parents[1] / "providers" / "testdata"
TOKEN_TYPES = ("input", "cache_read", "cache_write", "output", "reasoning")

APP = r'''
import json, sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-test-SECRET", max_retries=0)
out = {}
for case in sys.argv[2:]:
    if case == "chat":
        r = client.chat.completions.create(model="gpt-4o", extra_query={"case": "chat"},
            messages=[{"role": "user", "content": "hello"}])
        out[case] = {"model": r.model, "usage": r.usage.total_tokens}
    elif case == "stream":
        s = client.chat.completions.create(model="gpt-4o-mini", extra_query={"case": "stream"},
            stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "hello"}])
        text, usage = "", None
        for chunk in s:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage.total_tokens
        out[case] = {"text": text, "usage": usage}
    elif case == "stream-no-usage":
        s = client.chat.completions.create(model="gpt-4o-mini", extra_query={"case": "nousage"},
            stream=True, messages=[{"role": "user", "content": "hello"}])
        out[case] = {"chunks": sum(1 for _ in s)}
print(json.dumps(out))
'''


def expected(stem: str) -> dict[str, Any]:
    return dict(json.loads((DATA / f"{stem}.expected.json").read_text()))


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[tuple[FakeProvider, Path]]:
    tls = make_provider_tls(tmp_path / "tls", hosts=["localhost"])
    routes = {
        ("POST", "/v1/chat/completions?case=chat"): Script.json(
            json.loads((DATA / "openai-chat.response.json").read_text()),
            headers=[("x-request-id", "req_ebpf_chat")]),
        ("POST", "/v1/chat/completions?case=stream"): Script.sse(
            split_sse((DATA / "openai-chat-stream-usage.response.sse").read_bytes()),
            delay=0.002, headers=[("x-request-id", "req_ebpf_stream")]),
        ("POST", "/v1/chat/completions?case=nousage"): Script.sse(
            split_sse((DATA / "openai-chat-stream-no-usage.response.sse").read_bytes()),
            delay=0.002),
    }
    with FakeProvider(routes, cert=tls.cert, key=tls.key, listen="127.0.0.1:0") as fp:
        yield fp, tls.ca_cert


def run_app(cg: TestCgroup, base_url: str, ca: Path, *cases: str) -> dict[str, Any]:
    app = cg.child("app")
    res = subprocess.run(
        [sys.executable, "-c", APP, base_url, *cases], capture_output=True, text=True,
        env={"SSL_CERT_FILE": str(ca), "PATH": "/usr/bin:/bin", "NO_PROXY": "*"},
        preexec_fn=cg.joiner(app), timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def node_labels(cg: TestCgroup) -> dict[str, str]:
    """A process in no pod: workload = its command name, app = its cgroup's name."""
    return {"namespace": "", "workload": Path(sys.executable).name[:15], "team": "unattributed",
            "app": "app", "service_account": ""}


@pytest.fixture
def agent(cgroup: TestCgroup) -> Iterator[AgentProcess]:
    with running_agent("--no-kubernetes", "--llm-host", "localhost=openai",
                       cgroup=cgroup.root, libssl=[libssl_of_python()]) as a:
        yield a


def test_openai_sdk_exact_tokens_without_a_proxy(
        cgroup: TestCgroup, agent: AgentProcess,
        provider: tuple[FakeProvider, Path]) -> None:
    fp, ca = provider
    out = run_app(cgroup, f"{fp.url.replace('127.0.0.1', 'localhost')}/v1", ca,
                  "chat", "stream")
    chat, stream = expected("openai-chat"), expected("openai-chat-stream-usage")
    assert out["chat"] == {"model": chat["model"], "usage": sum(chat["tokens"].values())}
    assert out["stream"]["usage"] == sum(stream["tokens"].values())

    recs = agent.wait_records(2)
    assert len(recs) == 2, recs
    by_model = {r["model"]: r for r in recs}
    prices = PriceBook()
    for exp, streamed, rid in ((chat, False, "req_ebpf_chat"),
                               (stream, True, "req_ebpf_stream")):
        rec = by_model[exp["model"]]
        assert rec["tokens"] == exp["tokens"]
        assert rec["provider"] == "openai" and rec["operation"] == "chat"
        assert rec["host"] == "localhost" and rec["status"] == "200"
        assert rec["streamed"] is streamed and rec["request_id"] == rid
        assert rec["error"] is None and rec["usage_injected"] is False
        assert rec["cost_usd"] == pytest.approx(
            prices.price("openai", exp["model"], exp["tokens"], "default").cost_usd)
        assert (rec["time_to_first_token_seconds"] is not None) is streamed
        assert {k: rec[k] for k in node_labels(cgroup)} == node_labels(cgroup)
        assert "SECRET" not in json.dumps(rec)

    m = agent.metrics()
    ident = node_labels(cgroup)
    for exp in (chat, stream):
        for token_type in TOKEN_TYPES:
            assert total(m, "podtally_llm_tokens_total", model=exp["model"],
                         token_type=token_type, **ident) == exp["tokens"][token_type]
        assert total(m, "podtally_llm_requests_total", model=exp["model"], code="200",
                     operation="chat", provider="openai", **ident) == 1
    assert total(m, "podtally_llm_requests_total") == 2
    assert total(m, "podtally_ebpf_lost_events_total") == 0
    assert total(m, "podtally_metering_faults_total") == 0


def test_stream_without_usage_is_counted_with_unknown_tokens(
        cgroup: TestCgroup, agent: AgentProcess,
        provider: tuple[FakeProvider, Path]) -> None:
    """The agent only reads: it cannot ask a stream for usage as the sidecar does."""
    fp, ca = provider
    out = run_app(cgroup, f"{fp.url.replace('127.0.0.1', 'localhost')}/v1", ca,
                  "stream-no-usage")
    assert out["stream-no-usage"]["chunks"] > 1
    (rec,) = agent.wait_records(1)
    assert rec["tokens"] is None and rec["streamed"] is True and rec["status"] == "200"
    assert rec["model"] == expected("openai-chat-stream-no-usage")["model"]
    m = agent.metrics()
    assert total(m, "podtally_llm_requests_total", model=rec["model"]) == 1
    assert total(m, "podtally_llm_tokens_total") == 0
