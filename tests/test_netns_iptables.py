"""End-to-end: podtally.iptables rules in a real pod network namespace (needs root).

The pod and provider are network namespaces (tests/support/netns.py).  Inside the pod a
"proxy" listener (uid 1337) sits on 127.0.0.1:15001 and [::1]:15001 and reports the
connection's SO_ORIGINAL_DST; the provider answers on every address, ports 443, 80 and 8080.
Clients connect as the app (uid 1000) or the proxy (uid 1337) and print who answered.
"""

from __future__ import annotations

import json
import re
import selectors
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from support.netns import Netns, Pod, pod_with_provider, python_for_uid

from podtally.iptables import Family, IptablesConfig, apply, build_rules, parse_cidrs

pytestmark = pytest.mark.netns

APP_UID, PROXY_UID, PROXY_PORT = 1000, 1337, 15001
PROVIDER = "198.18.0.2"
PROVIDER6 = "2001:2::2"
EXCLUDED = "198.19.7.1"  # inside EXCLUDED_CIDR
OTHER = "198.19.0.1"  # another provider address, not excluded
EXCLUDED_CIDR = "198.19.7.0/24"

# Serves "tag,host,port" listeners; one JSON line per connection, then closes it.
SERVER = r"""
import json, socket, struct, sys, threading
SO_ORIGINAL_DST = 80  # == IP6T_SO_ORIGINAL_DST

def original_dst(conn):
    try:
        if conn.family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
            return "%s:%d" % (socket.inet_ntop(socket.AF_INET, raw[4:8]),
                              struct.unpack_from("!H", raw, 2)[0])
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)  # sockaddr_in6
        return "[%s]:%d" % (socket.inet_ntop(socket.AF_INET6, raw[8:24]),
                            struct.unpack_from("!H", raw, 2)[0])
    except OSError as exc:
        return "error:%s" % exc.errno

def fmt(addr):
    return ("[%s]:%d" if ":" in addr[0] else "%s:%d") % addr[:2]

def serve(tag, sock):
    while True:
        conn, peer = sock.accept()
        with conn:
            reply = {"tag": tag, "local": fmt(conn.getsockname()), "peer": peer[0],
                     "orig": original_dst(conn)}
            conn.sendall((json.dumps(reply) + "\n").encode())

threads = []
for spec in sys.argv[1:]:
    tag, host, port = spec.rsplit(",", 2)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, int(port)))
    sock.listen(16)
    threads.append(threading.Thread(target=serve, args=(tag, sock), daemon=True))
for t in threads:
    t.start()
print("READY", flush=True)
threading.Event().wait()
"""

# Connects to each "host:port" / "[v6]:port" argument; prints the reply or the error as JSON.
CLIENT = r"""
import json, socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5) as s:
            s.settimeout(5)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        print(data.decode().strip() or json.dumps({"error": "empty"}))
    except OSError as exc:
        print(json.dumps({"error": type(exc).__name__}))
"""

APPLY = (
    "import sys\n"
    "from podtally.iptables import IptablesConfig, apply\n"
    "apply(IptablesConfig.model_validate_json(sys.argv[1]))\n"
)


def _wait_ready(proc: subprocess.Popen[str], what: str, timeout: float = 15) -> None:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(max(0.0, deadline - time.monotonic())):
            line = proc.stdout.readline()
            if line.strip() == "READY":
                return
            if not line:
                break
    proc.kill()
    _, err = proc.communicate()
    raise AssertionError(f"{what} did not start (exit {proc.returncode}): {err}")


def _python(ns: Netns, uid: int, code: str, args: Sequence[str]) -> subprocess.Popen[str]:
    py = python_for_uid(uid)
    return ns.popen([py.executable, "-c", code, *args], uid=uid, env=py.env)


@pytest.fixture
def pod() -> Iterator[Pod]:
    with pod_with_provider(hosts=["api.openai.com", "api.anthropic.com"]) as pod:
        pod.provider.add_address(EXCLUDED)
        assert pod.provider.add_address() == OTHER
        provider = _python(
            pod.provider,
            0,
            SERVER,
            [f"provider,0.0.0.0,{p}" for p in (443, 80, 8080)] + ["provider,::,443"],
        )
        proxy = _python(
            pod,
            PROXY_UID,
            SERVER,
            [f"proxy,127.0.0.1,{PROXY_PORT}", f"proxy,::1,{PROXY_PORT}"],
        )
        local = _python(pod, 0, SERVER, ["pod-local,127.0.0.1,443"])
        for proc, what in ((provider, "provider"), (proxy, "proxy"), (local, "pod-local")):
            _wait_ready(proc, what)
        yield pod


def connect(pod: Pod, uid: int, *targets: str) -> list[dict[str, str]]:
    """Connect from the pod as ``uid`` to each target; the JSON replies, in order."""
    py = python_for_uid(uid)
    res = pod.run([py.executable, "-c", CLIENT, *targets], uid=uid, env=py.env)
    replies = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(replies) == len(targets), res
    return replies


def apply_in_pod(pod: Pod, cfg: IptablesConfig) -> None:
    """Like the init container: ``python -c 'apply(...)'`` as root inside the pod netns."""
    py = python_for_uid(0)
    pod.run([py.executable, "-c", APPLY, cfg.model_dump_json()], env=py.env)


def nat_rules(pod: Pod, save: str = "iptables-save") -> str:
    """``*-save -t nat`` without the timestamped comments and packet counters."""
    out = pod.run([save, "-t", "nat"]).stdout
    lines = [re.sub(r"\[\d+:\d+\]$", "[0:0]", ln) for ln in out.splitlines()]
    return "\n".join(ln for ln in lines if not ln.startswith("#")) + "\n"


CFG = IptablesConfig(exclude_cidrs=parse_cidrs(EXCLUDED_CIDR))  # ports 443,80 -> 127.0.0.1:15001


def test_before_apply_nothing_is_redirected(pod: Pod) -> None:
    [r] = connect(pod, APP_UID, f"{PROVIDER}:443")
    assert r["tag"] == "provider"


def test_app_traffic_redirected_with_original_destination(pod: Pod) -> None:
    apply_in_pod(pod, CFG)
    replies = connect(
        pod,
        APP_UID,
        f"{PROVIDER}:443",
        "api.openai.com:443",
        "api.anthropic.com:80",
        f"{OTHER}:443",
    )
    assert [(r["tag"], r["local"], r["orig"]) for r in replies] == [
        ("proxy", "127.0.0.1:15001", f"{PROVIDER}:443"),
        ("proxy", "127.0.0.1:15001", f"{PROVIDER}:443"),
        ("proxy", "127.0.0.1:15001", f"{PROVIDER}:80"),
        ("proxy", "127.0.0.1:15001", f"{OTHER}:443"),
    ]


def test_proxy_uid_goes_straight_to_provider(pod: Pod) -> None:
    apply_in_pod(pod, CFG)
    replies = connect(pod, PROXY_UID, f"{PROVIDER}:443", "api.openai.com:80")
    assert [(r["tag"], r["local"], r["peer"]) for r in replies] == [
        ("provider", f"{PROVIDER}:443", "198.18.0.1"),
        ("provider", f"{PROVIDER}:80", "198.18.0.1"),
    ]


def test_excluded_cidr_other_ports_and_loopback_not_redirected(pod: Pod) -> None:
    apply_in_pod(pod, CFG)
    replies = connect(pod, APP_UID, f"{EXCLUDED}:443", f"{PROVIDER}:8080", "127.0.0.1:443")
    assert [(r["tag"], r["local"]) for r in replies] == [
        ("provider", f"{EXCLUDED}:443"),
        ("provider", f"{PROVIDER}:8080"),
        ("pod-local", "127.0.0.1:443"),
    ]


def test_empty_ports_redirect_all_tcp(pod: Pod) -> None:
    apply_in_pod(pod, IptablesConfig(ports=(), exclude_cidrs=parse_cidrs(EXCLUDED_CIDR)))
    replies = connect(pod, APP_UID, f"{PROVIDER}:8080", f"{EXCLUDED}:8080", "127.0.0.1:443")
    assert [(r["tag"], r["orig"]) for r in replies][:1] == [("proxy", f"{PROVIDER}:8080")]
    assert [r["tag"] for r in replies[1:]] == ["provider", "pod-local"]


def test_ipv6_redirected_to_proxy_on_ipv6_loopback(pod: Pod) -> None:
    apply_in_pod(pod, CFG)
    [app] = connect(pod, APP_UID, f"[{PROVIDER6}]:443")
    assert (app["tag"], app["local"], app["orig"]) == ("proxy", "[::1]:15001", f"[{PROVIDER6}]:443")
    [proxy] = connect(pod, PROXY_UID, f"[{PROVIDER6}]:443")
    assert (proxy["tag"], proxy["local"]) == ("provider", f"[{PROVIDER6}]:443")


def _legacy(pod: Pod) -> Callable[..., subprocess.CompletedProcess[Any]]:
    def run(args: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        binary = re.sub(r"^(ip6?tables)-", r"\1-legacy-", args[0])
        return pod.subprocess_run([binary, *args[1:]], **kwargs)

    return run


@pytest.mark.parametrize("backend", ["default", "legacy"])
def test_apply_twice_is_idempotent(pod: Pod, backend: str) -> None:
    if backend == "default":
        apply_in_pod(pod, CFG)
        saves = ("iptables-save", "ip6tables-save")
    else:
        apply(CFG, runner=_legacy(pod))
        saves = ("iptables-legacy-save", "ip6tables-legacy-save")
    first = [nat_rules(pod, save) for save in saves]
    if backend == "default":
        apply_in_pod(pod, CFG)
        apply(CFG, runner=pod.subprocess_run)
    else:
        apply(CFG, runner=_legacy(pod))
    assert [nat_rules(pod, save) for save in saves] == first
    families: tuple[Family, ...] = (4, 6)
    for save, family in zip(saves, families, strict=True):
        rules = nat_rules(pod, save)
        assert rules.count("-j PODTALLY_OUTPUT") == 1, rules
        # Every rule we built is loaded verbatim (iptables-save prints them the same way).
        built = [ln for ln in build_rules(CFG, family=family).splitlines() if ln.startswith("-A")]
        assert sorted(ln for ln in rules.splitlines() if ln.startswith("-A")) == sorted(built)
    [r] = connect(pod, APP_UID, f"{PROVIDER}:443")
    assert (r["tag"], r["orig"]) == ("proxy", f"{PROVIDER}:443")


def test_reapply_with_new_config_replaces_rules(pod: Pod) -> None:
    apply_in_pod(pod, CFG)
    apply_in_pod(pod, IptablesConfig(ports=(8080,), proxy_uid=PROXY_UID))
    rules = nat_rules(pod)
    assert rules.count("-j PODTALLY_OUTPUT") == 1
    assert "--dport 443" not in rules and EXCLUDED_CIDR not in rules
    replies = connect(pod, APP_UID, f"{PROVIDER}:443", f"{PROVIDER}:8080")
    assert [r["tag"] for r in replies] == ["provider", "proxy"]
