"""Fixtures for the eBPF agent's tests: root, a cgroup subtree of the test's own, and an
HTTPS fake provider answering as `localhost` with recorded OpenAI payloads."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.ebpf_agent import DATA, TestCgroup
from support.fake_provider import FakeProvider, Script, make_provider_tls, split_sse


@pytest.fixture
def cgroup() -> Iterator[TestCgroup]:
    """A cgroup v2 subtree for the test's processes (the agent traces only these)."""
    if os.geteuid() != 0:
        pytest.fail("the eBPF agent tests need root (make test runs as root)")
    cg = TestCgroup()
    try:
        yield cg
    finally:
        cg.cleanup()


@dataclass
class Provider:
    server: FakeProvider
    ca: Path

    @property
    def base_url(self) -> str:
        """By name: the agent meters `--llm-host localhost=openai`."""
        return f"https://localhost:{self.server.port}/v1"


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[Provider]:
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
        yield Provider(fp, tls.ca_cert)
