"""Real uprobes on a real process: the official openai SDK calls a local HTTPS fake provider
directly (no proxy, real TLS), and the agent meters it from OpenSSL's plaintext.

The agent traces only the test's cgroup, so every number below is exact.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.ebpf_agent import (
    AgentProcess,
    TestCgroup,
    expected,
    libssl_of_python,
    run_openai_app,
    running_agent,
)
from support.sidecar import total

from podtally.pricing import PriceBook

from .conftest import Provider

pytestmark = pytest.mark.ebpf

TOKEN_TYPES = ("input", "cache_read", "cache_write", "output", "reasoning")
# A process in no pod: workload = its command name, app = its cgroup's name.
NODE_PROCESS = {"namespace": "", "workload": Path(sys.executable).name[:15],
                "team": "unattributed", "app": "app", "service_account": ""}


@pytest.fixture
def agent(cgroup: TestCgroup) -> Iterator[AgentProcess]:
    with running_agent("--no-kubernetes", "--llm-host", "localhost=openai",
                       cgroup=cgroup.root, libssl=[libssl_of_python()]) as a:
        yield a


def test_openai_sdk_exact_tokens_without_a_proxy(
        cgroup: TestCgroup, agent: AgentProcess, provider: Provider) -> None:
    out = run_openai_app(cgroup.child("app"), provider.base_url, provider.ca, "chat", "stream")
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
        assert rec["cost_usd"] > 0
        assert (rec["time_to_first_token_seconds"] is not None) is streamed
        assert {k: rec[k] for k in NODE_PROCESS} == NODE_PROCESS
        assert "SECRET" not in json.dumps(rec)

    m = agent.metrics()
    for exp in (chat, stream):
        for token_type in TOKEN_TYPES:
            assert total(m, "podtally_llm_tokens_total", model=exp["model"],
                         token_type=token_type, **NODE_PROCESS) == exp["tokens"][token_type]
        assert total(m, "podtally_llm_requests_total", model=exp["model"], code="200",
                     operation="chat", provider="openai", **NODE_PROCESS) == 1
        assert total(m, "podtally_llm_cost_usd_total", model=exp["model"]) == pytest.approx(
            by_model[exp["model"]]["cost_usd"])
    assert total(m, "podtally_llm_requests_total") == 2
    assert total(m, "podtally_llm_time_to_first_token_seconds_count") == 1
    assert total(m, "podtally_ebpf_lost_events_total") == 0
    assert total(m, "podtally_metering_faults_total") == 0


def test_stream_without_usage_is_counted_with_unknown_tokens(
        cgroup: TestCgroup, agent: AgentProcess, provider: Provider) -> None:
    """The agent only reads: it cannot ask a stream for usage as the sidecar does."""
    out = run_openai_app(cgroup.child("app"), provider.base_url, provider.ca,
                         "stream-no-usage")
    assert out["stream-no-usage"]["chunks"] > 1
    (rec,) = agent.wait_records(1)
    assert rec["tokens"] is None and rec["streamed"] is True and rec["status"] == "200"
    assert rec["model"] == expected("openai-chat-stream-no-usage")["model"]
    m = agent.metrics()
    assert total(m, "podtally_llm_requests_total", model=rec["model"]) == 1
    assert total(m, "podtally_llm_tokens_total") == 0
