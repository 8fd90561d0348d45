"""Everything `podtally sidecar` can be told, in one validated model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from podtally.identity import DEFAULT_TEAM_LABELS
from podtally.providers.registry import HostTable


class SidecarSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    ca_cert: Path
    """PEM CA certificate leaf certificates are minted from (the namespace's podtally CA)."""
    ca_key: Path
    """PEM private key of that CA. Read once at start; never logged."""
    mode: Literal["transparent", "regular"] = "transparent"
    """transparent: traffic redirected by init-iptables; regular: an explicit HTTP proxy."""
    listen_host: str = ""
    """Address the proxy listens on; empty means every address, IPv4 and IPv6, since the
    iptables redirect of IPv6 traffic lands on ::1."""
    port: int = Field(15001, ge=1, le=65535)
    """Proxy port; init-iptables redirects to it (Istio uses 15001 for the same role)."""
    metrics_port: int = Field(15090, ge=1, le=65535)
    """Port of /metrics, /healthz and /readyz (15090 is Istio's Envoy-metrics port)."""
    metrics_host: str = "0.0.0.0"
    """Prometheus scrapes the pod IP, so the metrics port listens on every interface."""
    upstream_ca_bundle: Path | None = None
    """Extra CAs trusted for upstream TLS, on top of the system store (in-cluster gateways)."""
    system_ca_bundle: Path = Path("/etc/ssl/certs/ca-certificates.crt")
    """The system trust store; certifi's bundle is used when this file is missing."""
    labels_file: Path | None = Path("/etc/podinfo/labels")
    """Downward-API labels file: team and app labels are read from it."""
    team_labels: tuple[str, ...] = DEFAULT_TEAM_LABELS
    """Pod labels naming the owning team, first present wins (chart: attribution.teamLabels)."""
    llm_hosts: tuple[str, ...] = ()
    """Extra LLM endpoints as HOST=PROVIDER (globs allowed), e.g. llm.internal=openai_compatible."""
    inject_stream_usage: bool = True
    """Ask OpenAI-shaped chat streams for usage and hide the extra chunk from the client."""
    price_overrides: Path | None = None
    """YAML/JSON file with per-model prices that win over the bundled price table."""
    drain_timeout: float = Field(25.0, ge=0)
    """On SIGTERM, at most this many seconds to finish in-flight streams and wait for one
    last scrape. Below Kubernetes' default 30 s terminationGracePeriodSeconds."""
    zero_first: bool = True
    """Expose a new series at 0 before adding its first call, so increase() sees it."""

    @field_validator("llm_hosts")
    @classmethod
    def _hosts_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            HostTable.parse_entry(entry)
        return value

    def host_table(self) -> HostTable:
        return HostTable(HostTable.parse_entry(e) for e in self.llm_hosts)
