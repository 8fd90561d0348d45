#!/usr/bin/env python3
"""Benchmark: what does the eBPF agent cost? Without and with the agent, side by side, in
one run (root; real uprobes on this machine's libssl):

1. per SSL event: a client process (in a cgroup of its own) calls SSL_write, then SSL_read,
   N times each with 1 KiB of plaintext against a local TLS peer; the CPU time of its
   thread per call (the kernel charges a uprobe's work to the probed thread; wall time
   would also count whatever else the 2 vCPUs run) without the agent, with it, and the
   difference — what one uprobe + uretprobe pair, the copy and the ring-buffer record add
   to the app. Also the agent's own CPU per event.
2. CPU at 100 requests/s: a client paced at 100 non-streamed chat calls per second (httpx,
   keep-alive, TLS) against the HTTPS fake provider for D seconds; the client's CPU
   without and with the agent, and the agent's CPU (/proc/<pid>/stat), each as % of one
   core. Every call must come out of the agent as a record with the recorded tokens.

Nothing leaves 127.0.0.1; every process, cgroup and probe this script starts is gone when it
exits. Exit status 1 when a check fails.

    .venv/bin/python bench/bench_ebpf_agent.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.ebpf_agent import (  # noqa: E402
    DATA,
    AgentProcess,
    TestCgroup,
    expected,
    libssl_of_python,
)
from support.fake_provider import FakeProvider, Script, make_provider_tls  # noqa: E402
from support.sidecar import total  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
AGENT_LAG_SECONDS = 1.5  # the agent's drain timer (1 s) and some

SSL_LOOP = r'''
import json, socket, ssl, sys, time
host, port, ca, n, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ctx = ssl.create_default_context(cafile=ca)
buf = b"x" * size
with socket.create_connection((host, port)) as raw, ctx.wrap_socket(raw, server_hostname=host) as s:
    s.sendall(b"w")
    for _ in range(200):  # warm-up
        s.sendall(buf)
    t0 = time.thread_time_ns()  # the thread's CPU: the probes' work is charged to it
    for _ in range(n):
        s.sendall(buf)
    write_ns = (time.thread_time_ns() - t0) / n
    s.sendall(b"r")
    got = 0
    while got < size * 200:
        got += len(s.recv(size))
    t0 = time.thread_time_ns()
    for _ in range(n):
        left = size
        while left:
            left -= len(s.recv(left))
    read_ns = (time.thread_time_ns() - t0) / n
print(json.dumps({"write_ns": write_ns, "read_ns": read_ns}))
'''

PACED = r'''
import json, sys, time, httpx
url, ca, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}
with httpx.Client(verify=ca, timeout=10) as client:
    client.post(url, json=body).raise_for_status()  # connect and warm up
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    n = int(rate * seconds)
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        client.post(url, json=body).raise_for_status()
    print(json.dumps({"calls": n + 1, "seconds": time.monotonic() - start}), flush=True)
'''


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


class TlsPeer:
    """Reads everything ("w" phase); on "r", sends 1 KiB records forever until closed."""

    def __init__(self, cert: Path, key: Path, size: int) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        self.size = size
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        payload = b"y" * self.size
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as s:
                while True:
                    data = s.recv(65536)
                    if not data:
                        return
                    if data.endswith(b"r"):
                        while True:
                            s.sendall(payload)
        except (OSError, ssl.SSLError):
            return

    def close(self) -> None:
        self.srv.close()


def ssl_events(cg: TestCgroup, peer: TlsPeer, ca: Path, n: int, size: int,
               runs: int) -> dict[str, float]:
    results = []
    for i in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", SSL_LOOP, "localhost", str(peer.port), str(ca), str(n),
             str(size)], capture_output=True, text=True, check=True,
            preexec_fn=TestCgroup.joiner(cg.child(f"ssl-{i}")), timeout=300)
        results.append(json.loads(out.stdout))
    return {k: statistics.median(r[k] for r in results) / 1000 for k in ("write_ns", "read_ns")}


def paced(cg: TestCgroup, url: str, ca: Path, rate: float, seconds: float) -> dict[str, float]:
    """The paced client alone (no agent): its CPU."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PACED, url, str(ca), str(rate), str(seconds)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        preexec_fn=TestCgroup.joiner(cg.child("paced")))
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "ready"
    c0 = cpu_seconds(proc.pid)
    t0 = time.monotonic()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    done = json.loads(proc.stdout.readline())
    wall = time.monotonic() - t0
    c1 = cpu_seconds(proc.pid)
    proc.wait(10)
    return {"calls": done["calls"], "wall": wall, "client_cpu_pct": 100 * (c1 - c0) / wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_ebpf_agent: needs root (uprobes)", file=sys.stderr)
        return 1
    n, runs, seconds = (5_000, 3, 5.0) if args.quick else (50_000, 5, 20.0)
    rate, size = 100.0, 1024
    failures: list[str] = []
    started = time.monotonic()
    cg = TestCgroup()
    work = Path(tempfile.mkdtemp(prefix="podtally-bench-ebpf-"))
    try:
        tls = make_provider_tls(work / "tls", hosts=["localhost"])
        peer = TlsPeer(tls.cert, tls.key, size)
        chat = json.loads((DATA / "openai-chat.response.json").read_text())
        provider = FakeProvider({("POST", "/v1/chat/completions"): Script.json(chat)},
                                cert=tls.cert, key=tls.key, listen="127.0.0.1:0")
        provider.start()
        url = f"https://localhost:{provider.port}/v1/chat/completions"

        print("# podtally ebpf-agent benchmark" + (" (quick)" if args.quick else ""))
        print(f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs, kernel "
              f"{platform.release()}, Python {platform.python_version()}")
        base_events = ssl_events(cg, peer, tls.ca_cert, n, size, runs)
        base_paced = paced(cg, url, tls.ca_cert, rate, seconds)

        agent = AgentProcess("--no-kubernetes", "--llm-host", "localhost=openai",
                             "--no-records", cgroup=cg.root, libssl=[libssl_of_python()])
        try:
            t = time.monotonic()
            agent.wait_ready()
            ready_s = time.monotonic() - t
            rss_idle = int(Path(f"/proc/{agent.proc.pid}/status").read_text()
                           .split("VmRSS:")[1].split()[0]) / 1024
            a0 = cpu_seconds(agent.proc.pid)
            m0 = agent.metrics()
            with_events = ssl_events(cg, peer, tls.ca_cert, n, size, runs)
            want = runs * (2 * n + 402)

            def delta(m: dict[Any, float], name: str) -> float:
                return sum(total(m, name, kind=k) - total(m0, name, kind=k)
                           for k in ("write", "read"))

            # The agent drains the ring every second (sooner when a quarter of it is
            # queued): wait for the last records.
            m1 = agent.wait_metric(lambda m: delta(m, "podtally_ebpf_events_total")
                                   + delta(m, "podtally_ebpf_lost_events_total") >= want)
            a1 = cpu_seconds(agent.proc.pid)
            seen = delta(m1, "podtally_ebpf_events_total")
            agent_us_per_event = 1e6 * (a1 - a0) / seen if seen else float("nan")
            loop_lost = delta(m1, "podtally_ebpf_lost_events_total")
            # The paced load is checked by the agent's metrics (records are off).
            before = total(agent.metrics(), "podtally_llm_requests_total")
            with_paced = paced_metrics(cg, url, tls.ca_cert, rate, seconds, agent, before)
            m2 = agent.metrics()
            lost = total(m2, "podtally_ebpf_lost_events_total")
            tokens = expected("openai-chat")["tokens"]
            got_out = total(m2, "podtally_llm_tokens_total", token_type="output")
            rss_after = int(Path(f"/proc/{agent.proc.pid}/status").read_text()
                            .split("VmRSS:")[1].split()[0]) / 1024
        finally:
            rc = agent.terminate()
        if rc != 0:
            failures.append(f"agent exited {rc}")

        # The same with the public SSL_* symbols probed (two traps per call).
        slow = AgentProcess("--no-kubernetes", "--no-records", "--no-fast-probes",
                            cgroup=cg.root, libssl=[libssl_of_python()])
        try:
            slow.wait_ready()
            public_events = ssl_events(cg, peer, tls.ca_cert, n, size, runs)
        finally:
            if slow.terminate() != 0:
                failures.append("agent (public symbols) did not exit cleanly")

        calls = with_paced["calls"]
        checks = [
            ("metered calls at 100 rps", with_paced["metered"], calls),
            ("output tokens metered", got_out, tokens["output"] * calls),
            # Every SSL call of the loops is either seen or counted lost (per run: the "w"
            # and "r" markers, 200 warm-up writes and reads, n of each). The loops are a
            # firehose no app produces (~200k calls/s); losses there are reported below.
            ("SSL events seen + lost", seen + loop_lost, want),
            ("events lost at 100 req/s", lost - loop_lost, 0),
        ]
        print()
        for name, got, want in checks:
            ok = got == want
            print(f"CHECK {'ok  ' if ok else 'FAIL'} {name} = {got:,.0f} (expected {want:,.0f})")
            if not ok:
                failures.append(name)
        rows = [
            ("SSL_write, 1 KiB, CPU per call (µs)", base_events["write_ns"], with_events["write_ns"]),
            ("SSL_read, 1 KiB, CPU per call (µs)", base_events["read_ns"], with_events["read_ns"]),
        ]
        print()
        public = {"SSL_write": public_events["write_ns"], "SSL_read": public_events["read_ns"]}
        print("| measure | without agent | with agent | agent adds | public symbols probed: adds |")
        print("|---|---:|---:|---:|---:|")
        for name, a, b in rows:
            p = public[name.split(",")[0]]
            print(f"| {name} | {a:.2f} | {b:.2f} | {b - a:+.2f} | {p - a:+.2f} |")
        print(f"| agent CPU per SSL event, user space (µs) | — | {agent_us_per_event:.1f} | |")
        print(f"| SSL calls of the {n:,}-call loops lost (ring full) | — | {loop_lost:,.0f} of "
              f"{runs * (2 * n + 402):,} | |")
        print(f"| client CPU at {rate:.0f} req/s (% of a core) | {base_paced['client_cpu_pct']:.2f} "
              f"| {with_paced['client_cpu_pct']:.2f} | "
              f"{with_paced['client_cpu_pct'] - base_paced['client_cpu_pct']:+.2f} |")
        print(f"| agent CPU at {rate:.0f} req/s (% of a core) | — | "
              f"{with_paced['agent_cpu_pct']:.2f} | |")
        print(f"| agent start to ready (s) / RSS idle, after load (MB) | — | "
              f"{ready_s:.2f} / {rss_idle:.0f}, {rss_after:.0f} | |")
        result = {"base_events_us": base_events, "with_events_us": with_events,
                  "public_symbols_events_us": public_events,
                  "agent_us_per_event": agent_us_per_event, "base_paced": base_paced,
                  "with_paced": with_paced, "ready_s": ready_s, "rss_idle_mb": rss_idle,
                  "rss_after_mb": rss_after, "checks": checks,
                  "wall_seconds": time.monotonic() - started}
        print(f"\n(total run {result['wall_seconds']:.0f} s)")
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        provider.stop()
        peer.close()
    finally:
        cg.cleanup()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


def paced_metrics(cg: TestCgroup, url: str, ca: Path, rate: float, seconds: float,
                  agent: AgentProcess, before: float) -> dict[str, float]:
    """`paced` with the agent attached; calls are checked in its metrics (no records)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PACED, url, str(ca), str(rate), str(seconds)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        preexec_fn=TestCgroup.joiner(cg.child("paced")))
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "ready"
    # The warm-up call is metered before the window opens.
    deadline = time.monotonic() + 10
    while total(agent.metrics(), "podtally_llm_requests_total") < before + 1:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    c0, a0 = cpu_seconds(proc.pid), cpu_seconds(agent.proc.pid)
    t0 = time.monotonic()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    done = json.loads(proc.stdout.readline())
    wall = time.monotonic() - t0
    c1 = cpu_seconds(proc.pid)
    # The agent reads the last second of calls up to a second later (its drain timer):
    # their CPU is counted too, before anything scrapes it.
    time.sleep(AGENT_LAG_SECONDS)
    a1 = cpu_seconds(agent.proc.pid)
    proc.wait(10)
    deadline = time.monotonic() + 30
    metered = 0.0
    while time.monotonic() < deadline:
        metered = total(agent.metrics(), "podtally_llm_requests_total") - before
        if metered >= done["calls"]:
            break
        time.sleep(0.1)
    return {"calls": done["calls"], "metered": metered, "wall": wall,
            "client_cpu_pct": 100 * (c1 - c0) / wall, "agent_cpu_pct": 100 * (a1 - a0) / wall}


if __name__ == "__main__":
    raise SystemExit(main())
