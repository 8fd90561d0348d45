"""Which TCP connections go to LLM endpoints, and whether a sidecar meters them.

Definitions (the README's, in code):

- An **LLM endpoint** is an (address, port) in the agent's endpoint table: the addresses the
  node resolves the LLM host names to (the built-in provider hosts and `--llm-host`, on
  443), and the `--llm-endpoint CIDR[:PORT]=PROVIDER` entries.
- A **connection** is a TCP connect() leaving CLOSE for SYN_SENT, to the destination the
  process asked for (before any NAT: a pod's iptables redirect does not change it).
- It is **metered by a sidecar** (`via="sidecar"`) when the connecting process is in a pod
  that has a podtally sidecar and the pod's capture rules (its `podtally-init` ports and
  excluded CIDRs) send that destination through the sidecar; it is the sidecar's own
  upstream leg (`via="proxy"`) when the process runs as the sidecar's uid in such a pod (or,
  outside any pod, as the proxy uid). Every other connection is **unmetered**
  (`via="direct"`): a pod without a sidecar, a destination its rules do not capture, or a
  node process.

Pure: the agent feeds connect events, pod lookups and resolved addresses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from podtally.ebpf.attribution import DEFAULT_PROXY_UID, PodInfo

Via = Literal["sidecar", "proxy", "direct"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Endpoint:
    network: Network
    port: int | None  # None: any port
    provider: str


def parse_endpoint(entry: str) -> Endpoint:
    """`CIDR[:PORT]=PROVIDER` (IPv6 with a port in brackets: `[2001:db8::/32]:443`)."""
    target, sep, provider = entry.partition("=")
    if not sep or not provider.strip():
        raise ValueError(f"not ADDRESS[:PORT]=PROVIDER: {entry!r}")
    target = target.strip()
    port: int | None = None
    if target.startswith("["):
        addr, _, rest = target[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif target.count(":") == 1:
        addr, _, port_text = target.partition(":")
        port = int(port_text)
    else:
        addr = target
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"port out of range in {entry!r}")
    return Endpoint(ipaddress.ip_network(addr, strict=False), port, provider.strip())


class EndpointTable:
    """Addresses of LLM endpoints → provider: configured entries plus resolved host names
    (replaced wholesale on every re-resolution)."""

    def __init__(self, configured: Iterable[Endpoint] = ()) -> None:
        self.configured = tuple(configured)
        self._resolved: dict[tuple[str, int], str] = {}

    def set_resolved(self, resolved: dict[tuple[str, int], str]) -> None:
        self._resolved = dict(resolved)

    def __len__(self) -> int:
        return len(self.configured) + len(self._resolved)

    def provider_for(self, address: str, port: int) -> str | None:
        found = self._resolved.get((address, port))
        if found is not None:
            return found
        ip = ipaddress.ip_address(address)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for ep in self.configured:
            if ep.network.version == ip.version and ip in ep.network and (
                    ep.port is None or ep.port == port):
                return ep.provider
        return None


def classify(uid: int, pod: PodInfo | None, address: str, port: int, *,
             proxy_uid: int = DEFAULT_PROXY_UID) -> Via:
    """How a connection from a process (its uid, its pod if any) is metered."""
    if pod is None:
        return "proxy" if uid == proxy_uid else "direct"
    if not pod.has_sidecar:
        return "direct"
    if uid == pod.proxy_uid:
        return "proxy"
    return "sidecar" if pod.redirects(address, port) else "direct"
