"""Everything `podtally ebpf-agent` can be told, in one validated model."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from podtally.ebpf.attribution import DEFAULT_PROXY_UID
from podtally.ebpf.coverage import Endpoint, parse_endpoint
from podtally.identity import DEFAULT_TEAM_LABELS
from podtally.providers.registry import HostTable


class AgentSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    metrics_port: int = Field(15091, ge=1, le=65535)
    """Port of /metrics, /healthz, /readyz (the sidecar's 15090 plus one: both can run on
    one host network)."""
    metrics_host: str = "0.0.0.0"
    """The DaemonSet runs on the host network: Prometheus scrapes the node address."""
    llm_hosts: tuple[str, ...] = ()
    """Extra LLM endpoints as HOST=PROVIDER (globs allowed), as the sidecar's --llm-host:
    requests to these hosts are metered, and exact names are resolved for coverage."""
    llm_endpoints: tuple[str, ...] = ()
    """LLM endpoint addresses as CIDR[:PORT]=PROVIDER, for coverage (in-cluster servers,
    providers whose addresses the node cannot resolve)."""
    resolve_seconds: float = Field(60.0, gt=0)
    """How often the LLM host names are resolved again (provider addresses move)."""
    proxy_uid: int = Field(DEFAULT_PROXY_UID, ge=0)
    """The sidecar's uid: its plaintext is never copied (the sidecar meters it), and outside
    any pod its connections are the proxy's own."""
    team_labels: tuple[str, ...] = DEFAULT_TEAM_LABELS
    """Pod (then namespace) labels naming the owning team, first present wins."""
    node_name: str | None = None
    """This node (NODE_NAME from the downward API): only its pods are watched."""
    kubeconfig: Path | None = None
    """A kubeconfig to reach the API server (default: in-cluster when running in a pod)."""
    api_server: str | None = None
    """An explicit API server URL (tests, `kubectl proxy`); wins over kubeconfig."""
    kubernetes: bool = True
    """False: no pod metadata; processes are labelled by command and cgroup."""
    cgroup: Path | None = None
    """Trace only tasks under this cgroup v2 directory (e.g. the kubepods slice)."""
    ringbuf_pages: int = Field(1024, ge=1)
    """Ring buffer size in 4 KiB pages, a power of two (1024 = 4 MiB). When it is full,
    events are dropped and counted, never waited for."""
    libssl: tuple[Path, ...] = ()
    """Files to attach to besides those discovered (a libssl, or a static binary)."""
    fast_probes: bool = True
    """Probe the internal functions behind SSL_write_ex/SSL_read_ex when the code matches
    (one trap per call instead of two; podtally.ebpf.prologue); False: the public symbols."""
    discover: bool = True
    """Find the libssl files (and static OpenSSL binaries) processes map, every
    rescan_seconds."""
    rescan_seconds: float = Field(10.0, gt=0)
    """How often /proc is scanned for new libssl files to attach to."""
    max_connections: int = Field(4096, ge=1)
    """TLS connections followed at once; the least recently active is dropped beyond."""
    price_overrides: Path | None = None
    """YAML/JSON file with per-model prices that win over the bundled price table."""
    records: bool = True
    """Write one JSON usage record per call on stdout, as the sidecar does."""
    zero_first: bool = True
    """Expose a new series at 0 before adding its first value, so increase() sees it."""

    @field_validator("llm_hosts")
    @classmethod
    def _hosts_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            HostTable.parse_entry(entry)
        return value

    @field_validator("llm_endpoints")
    @classmethod
    def _endpoints_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            parse_endpoint(entry)
        return value

    @field_validator("ringbuf_pages")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"must be a power of two, not {value}")
        return value

    def host_table(self) -> HostTable:
        return HostTable(HostTable.parse_entry(e) for e in self.llm_hosts)

    def endpoints(self) -> list[Endpoint]:
        return [parse_endpoint(e) for e in self.llm_endpoints]
