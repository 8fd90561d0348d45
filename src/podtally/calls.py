"""One metered LLM call as any data plane sees it: request → response bytes → CallFacts.

Pure and shared: the sidecar's mitmproxy addon and the eBPF agent both drive a
`MeteredCall` with what they saw on the wire (request line, headers and body; response
status, headers and body chunks, each with the time it was seen), and both get the same
`CallFacts`, hence the same records and metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from podtally.providers.decoding import Decoder, decoder_for
from podtally.providers.registry import CallSpec, HostTable, detect, provider_for_plain_http
from podtally.records import CallFacts

REQUEST_ID_HEADERS = ("x-request-id", "request-id", "apim-request-id", "x-amzn-requestid")


def request_id(headers: Mapping[str, str] | None) -> str | None:
    """The provider's request id from response headers (lower-case names), capped."""
    if headers is None:
        return None
    for name in REQUEST_ID_HEADERS:
        value = headers.get(name)
        if value:
            return value[:128]
    return None


def host_of(authority: str) -> str:
    """`host[:port]` → host (IPv6 literals in brackets kept whole)."""
    if authority.startswith("["):
        return authority.split("]", 1)[0] + "]"
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def provider_of(hosts: HostTable, host: str, *, tls: bool, port: int | None,
                path: str) -> str | None:
    """The provider of a request: by host name; plain HTTP also by an LLM API path."""
    provider = hosts.provider_for(host or None)
    if provider is None and not tls:
        provider = provider_for_plain_http(host, port, path)
    return provider


@dataclass
class MeteredCall:
    """One metered call in flight; `feed` takes the response body as it arrives."""

    spec: CallSpec
    host: str
    started: float
    usage_injected: bool = False
    parser: Any = None
    decode: Decoder | None = None
    first_token_at: float | None = None
    metering: bool = True  # False after a fault: parsing stops, the call is still counted
    errors: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, provider: str, host: str, method: str, path: str, body: bytes,
              started: float, *, body_encoded: bool = False) -> MeteredCall | None:
        """The call to meter for this request, or None when it is not a metered call."""
        spec = detect(provider, method, path, b"" if body_encoded else body)
        return None if spec is None else cls(spec=spec, host=host, started=started)

    def open_response(self, headers: Mapping[str, str]) -> None:
        """Response headers (lower-case names) arrived: choose the parser and decoder."""
        self.parser = self.spec.parser(headers.get("content-type", ""), headers)
        self.decode = decoder_for(headers.get("content-encoding", ""))
        if self.decode is None:
            self.errors.append("unsupported content-encoding")
            self.metering = False

    def feed(self, data: bytes, now: float) -> None:
        """A response body chunk; raises on a parser fault (the caller counts it and
        calls `stop_metering`)."""
        if not self.metering or not data or self.decode is None:
            return
        self.parser.feed(self.decode(data))
        if self.first_token_at is None and self.parser.saw_output:
            self.first_token_at = now

    def stop_metering(self, reason: str | None = None) -> None:
        self.metering = False
        if reason:
            self.errors.append(reason)

    @property
    def ended(self) -> bool:
        """The provider's own end-of-response marker was seen."""
        return bool(self.parser is not None and self.parser.ended)

    def facts(self, *, status: str, ended: float, complete: bool,
              failure: str | None = None, request_id: str | None = None) -> list[CallFacts]:
        """What the call amounts to: one CallFacts (a Batch output file: one per line).

        `failure`: "client disconnected" / "upstream error" when the exchange broke;
        `complete`: the whole response body was seen.
        """
        usage = None
        if self.parser is not None and self.metering:
            usage = self.parser.finish(complete=complete and failure is None)
        error = failure or ("; ".join(self.errors) if self.errors else None)
        facts = CallFacts(
            provider=self.spec.provider,
            host=self.host,
            operation=self.spec.operation,
            request_model=self.spec.request_model,
            streamed=bool(self.parser is not None and self.parser.streaming),
            status=status,
            usage=usage,
            started=self.started,
            ended=ended,
            first_token_at=self.first_token_at,
            request_id=request_id,
            usage_injected=self.usage_injected,
            error=error,
        )
        if self.spec.family != "openai_batch":
            return [facts]
        # A batch output file: one call per result line, none for the download itself.
        lines = self.parser.acc.lines if self.parser is not None and self.metering else []
        return [
            replace(facts, operation=line.operation, request_model=None, streamed=False,
                    status=line.status, usage=line.usage, request_id=line.request_id)
            for line in lines
        ]
