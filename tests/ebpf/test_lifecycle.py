"""The agent must never take a node down: a full ring buffer loses events (counted, exact)
and the agent goes on; on exit nothing stays attached; files are found by discovery."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.ebpf_agent import (
    AgentProcess,
    TestCgroup,
    expected,
    libssl_of_python,
    run_openai_app,
    running_agent,
)
from support.fake_provider import make_provider_tls
from support.sidecar import total

from podtally.ebpf.events import CONNECT_SIZE, DATA_HEADER_SIZE, ringbuf_record_size

from .conftest import Provider

pytestmark = pytest.mark.ebpf

PAGES = 16  # a 64 KiB ring buffer
WRITES, WRITE_SIZE = 200, 10_000

WRITER = r'''
import socket, ssl, sys
host, port, ca, n, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ctx = ssl.create_default_context(cafile=ca)
with socket.create_connection((host, port)) as raw, ctx.wrap_socket(raw, server_hostname=host) as s:
    for _ in range(n):
        s.sendall(b"x" * size)  # one SSL_write each: no HTTP, just bytes
'''


@pytest.fixture
def tls_sink(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A TLS server (outside the traced cgroup) that reads and drops everything."""
    tls = make_provider_tls(tmp_path / "sink", hosts=["localhost"])
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert, tls.key)
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with ctx.wrap_socket(conn, server_side=True) as s:
                while s.recv(65536):
                    pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield srv.getsockname()[1], tls.ca_cert
    finally:
        srv.close()


def test_full_ring_buffer_loses_counted_events_and_the_agent_goes_on(
        cgroup: TestCgroup, tls_sink: tuple[int, Path], provider: Provider) -> None:
    port, ca = tls_sink
    with running_agent("--no-kubernetes", "--llm-host", "localhost=openai",
                       "--ringbuf-pages", str(PAGES),
                       cgroup=cgroup.root, libssl=[libssl_of_python()]) as agent:
        # The agent stops reading; the writer's events fill the ring buffer.
        os.kill(agent.proc.pid, signal.SIGSTOP)
        try:
            subprocess.run([sys.executable, "-c", WRITER, "localhost", str(port), str(ca),
                            str(WRITES), str(WRITE_SIZE)],
                           preexec_fn=TestCgroup.joiner(cgroup.child("writer")),
                           check=True, timeout=60)
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)
        # Lost events are counted in the kernel, the others once the agent has drained them.
        m = agent.wait_metric(lambda m: total(m, "podtally_ebpf_events_total", kind="write")
                              + total(m, "podtally_ebpf_lost_events_total", kind="write")
                              >= WRITES and total(m, "podtally_ebpf_events_total",
                                                  kind="close") >= 1)

        # What fits in the ring: the connect (first), then whole write records; the writer's
        # SSL_free (a header-only record) still fits in what is left.
        ring = PAGES * 4096
        write_rec = ringbuf_record_size(DATA_HEADER_SIZE + WRITE_SIZE)
        fit = (ring - ringbuf_record_size(CONNECT_SIZE)) // write_rec
        events = "podtally_ebpf_events_total"
        lost = "podtally_ebpf_lost_events_total"
        assert total(m, events, kind="write") == fit == 6
        assert total(m, lost, kind="write") == WRITES - fit
        assert total(m, events, kind="connect") == 1
        assert total(m, events, kind="close") == 1
        assert total(m, lost) == WRITES - fit
        assert total(m, "podtally_ebpf_unparsed_connections_total", reason="unparsed") == 1
        assert agent.proc.poll() is None

        # And it still meters, exactly.
        run_openai_app(cgroup.child("app"), provider.base_url, provider.ca, "chat")
        (rec,) = agent.wait_records(1)
        assert rec["tokens"] == expected("openai-chat")["tokens"]
        assert total(agent.metrics(), lost) == WRITES - fit  # nothing more lost


IGNORED_CLIENT = r'''
import socket, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
with socket.create_connection((host, port)) as raw, ctx.wrap_socket(raw, server_hostname=host) as s:
    for line in sys.stdin:
        for _ in range(int(line)):
            s.sendall(b"GET /file HTTP/1.1\r\nHost: example.com\r\n\r\n")
        print("sent", flush=True)
'''


def test_a_connection_to_another_host_is_no_longer_copied(
        cgroup: TestCgroup, tls_sink: tuple[int, Path]) -> None:
    port, ca = tls_sink
    with running_agent("--no-kubernetes", "--llm-host", "localhost=openai",
                       cgroup=cgroup.root, libssl=[libssl_of_python()]) as agent:
        app = subprocess.Popen([sys.executable, "-c", IGNORED_CLIENT, "localhost", str(port),
                                str(ca)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, preexec_fn=TestCgroup.joiner(cgroup.child("app")))
        assert app.stdin is not None and app.stdout is not None
        try:
            app.stdin.write("1\n")
            app.stdin.flush()
            assert app.stdout.readline() == "sent\n"
            # The first request says it: example.com is no LLM host. The kernel is told.
            agent.wait_metric(lambda m: total(m, "podtally_ebpf_ignored_connections_total")
                              >= 1)
            app.stdin.write("50\n")
            app.stdin.flush()
            assert app.stdout.readline() == "sent\n"
        finally:
            app.stdin.close()
            app.wait(10)
        m = agent.wait_metric(lambda m: total(m, "podtally_ebpf_events_total", kind="close")
                              >= 1)
        assert total(m, "podtally_ebpf_ignored_connections_total") == 1
        assert total(m, "podtally_ebpf_events_total", kind="write") == 1  # not the 50 after
        assert total(m, "podtally_ebpf_lost_events_total") == 0


def _perf_links(pid: int) -> list[dict[str, Any]]:
    out = subprocess.run(["bpftool", "-j", "perf", "show"], capture_output=True, text=True,
                         check=True).stdout
    return [e for e in json.loads(out or "[]") if e["pid"] == pid]


def _prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {p["id"] for p in json.loads(out or "[]")}


def _uprobe_events() -> str:
    return Path("/sys/kernel/tracing/uprobe_events").read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_nothing_stays_attached_after_exit(cgroup: TestCgroup, sig: signal.Signals) -> None:
    libssl = libssl_of_python()
    bpffs = sorted(os.listdir("/sys/fs/bpf")) if os.path.isdir("/sys/fs/bpf") else []
    agent = AgentProcess("--no-kubernetes", cgroup=cgroup.root, libssl=[libssl])
    try:
        agent.wait_ready()
        links = _perf_links(agent.proc.pid)
        kinds = sorted(e["fd_type"] for e in links)
        # OpenSSL 3's internal write and read functions (entry and return), SSL_free, and
        # the tracepoint (podtally.ebpf.prologue).
        assert kinds == ["tracepoint"] + ["uprobe"] * 3 + ["uretprobe"] * 2
        assert {e["filename"] for e in links if e["fd_type"] != "tracepoint"} == {libssl}
        progs = {e["prog_id"] for e in links}
        assert progs <= _prog_ids()
    finally:
        os.kill(agent.proc.pid, sig)
        rc = agent.proc.wait(30)
    assert rc == (0 if sig == signal.SIGTERM else -signal.SIGKILL), agent.stderr
    if sig == signal.SIGTERM:
        assert "detached, exiting" in agent.stderr
    deadline = time.monotonic() + 10  # the kernel frees programs after their last link
    while progs & _prog_ids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _perf_links(agent.proc.pid) == []
    assert progs & _prog_ids() == set()
    assert libssl not in _uprobe_events() and "bcc_" not in _uprobe_events()
    assert (sorted(os.listdir("/sys/fs/bpf")) if os.path.isdir("/sys/fs/bpf") else []) == bpffs


def test_discovery_attaches_to_the_libssl_a_running_process_maps(
        cgroup: TestCgroup, provider: Provider, tmp_path: Path) -> None:
    """Started after the app and before it loads libssl (ssl is imported after the gate),
    with no --libssl: the agent finds the libssl files in the app's filesystem and what
    processes map (through /proc/<pid>/root, as it would a container's) and meters the
    app's call."""
    gate = tmp_path / "gate"
    app = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys, time\n"
         f"while not os.path.exists({str(gate)!r}): time.sleep(0.05)\n"
         "import openai\n"
         f"c = openai.OpenAI(base_url={provider.base_url!r}, api_key='k', max_retries=0)\n"
         "r = c.chat.completions.create(model='gpt-4o', extra_query={'case': 'chat'},"
         " messages=[{'role': 'user', 'content': 'hi'}])\n"
         "print(r.model)\n"],
        env={"SSL_CERT_FILE": str(provider.ca), "PATH": "/usr/bin:/bin"},
        preexec_fn=TestCgroup.joiner(cgroup.child("app")), stdout=subprocess.PIPE, text=True)
    try:
        with running_agent("--no-kubernetes", "--llm-host", "localhost=openai",
                           cgroup=cgroup.root, discover=True) as agent:
            m = agent.metrics()
            assert total(m, "podtally_ebpf_attached_files") >= 1
            gate.touch()
            out, _ = app.communicate(timeout=60)
            assert out.strip() == expected("openai-chat")["model"]
            (rec,) = agent.wait_records(1)
            assert rec["tokens"] == expected("openai-chat")["tokens"]
    finally:
        app.kill()
        app.wait()


def test_without_privileges_it_says_why_and_exits_1() -> None:
    from support.netns import python_for_uid
    from support.sidecar import free_port

    py = python_for_uid(1000)
    res = subprocess.run(
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--",
         py.executable, "-m", "podtally.cli", "ebpf-agent", "--no-kubernetes", "--no-discover",
         "--metrics-port", str(free_port())],
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
        env={**py.env, "PATH": "/usr/bin:/bin", "PYTHONPATH": py.env.get("PYTHONPATH", "")})
    assert res.returncode == 1, res.stderr
    assert "cannot load the probes" in res.stderr and "make ebpf-deps" in res.stderr
