"""Which connections are LLM traffic, and which parser meters a request.

Two questions, both pure: `HostTable.provider_for(host)` decides at TLS ClientHello time
whether a connection is decrypted at all; `detect(...)` decides, per HTTP request, whether
it is a metered LLM call and how to read its response.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from podtally.providers.anthropic import AnthropicAccumulator
from podtally.providers.base import Accumulator, ResponseParser
from podtally.providers.openai import OpenAIAccumulator

Family = Literal["openai", "anthropic"]

# Built-in LLM endpoints (exact names or fnmatch globs) → OpenTelemetry provider name.
BUILTIN_HOSTS: tuple[tuple[str, str], ...] = (
    ("api.openai.com", "openai"),
    ("api.anthropic.com", "anthropic"),
    ("*.openai.azure.com", "azure.ai.openai"),
    ("*.cognitiveservices.azure.com", "azure.ai.openai"),
    ("*.services.ai.azure.com", "azure.ai.openai"),
    ("generativelanguage.googleapis.com", "gcp.gemini"),
    ("aiplatform.googleapis.com", "gcp.vertex_ai"),
    ("*-aiplatform.googleapis.com", "gcp.vertex_ai"),
    ("bedrock-runtime.*.amazonaws.com", "aws.bedrock"),
    ("bedrock-runtime-fips.*.amazonaws.com", "aws.bedrock"),
    ("api.deepseek.com", "deepseek"),
    ("api.mistral.ai", "mistral_ai"),
    ("api.groq.com", "groq"),
    ("api.x.ai", "x_ai"),
    ("api.cohere.com", "cohere"),
    ("api.cohere.ai", "cohere"),
)

# Providers whose chat streams carry usage only when asked (stream_options.include_usage).
_USAGE_OPT_IN = frozenset({"openai", "openai_compatible", "azure.ai.openai"})


class HostTable:
    """LLM host names → provider. Extended by configuration (`host=provider` entries)."""

    def __init__(self, extra: Iterable[tuple[str, str]] = ()) -> None:
        entries = list(extra) + list(BUILTIN_HOSTS)  # configuration wins over built-ins
        self._exact: dict[str, str] = {}
        self._globs: list[tuple[str, str]] = []
        for pattern, provider in entries:
            pattern = pattern.lower().rstrip(".")
            if any(c in pattern for c in "*?["):
                self._globs.append((pattern, provider))
            else:
                self._exact.setdefault(pattern, provider)

    @staticmethod
    def parse_entry(entry: str) -> tuple[str, str]:
        host, sep, provider = entry.partition("=")
        if not sep or not host.strip() or not provider.strip():
            raise ValueError(f"LLM host entry {entry!r} is not of the form HOST=PROVIDER")
        return host.strip(), provider.strip()

    def provider_for(self, host: str | None) -> str | None:
        if not host:
            return None
        host = host.lower().rstrip(".")
        if host in self._exact:
            return self._exact[host]
        for pattern, provider in self._globs:
            if fnmatch.fnmatchcase(host, pattern):
                return provider
        return None


@dataclass(frozen=True)
class CallSpec:
    """A request recognised as a metered LLM call."""

    provider: str
    family: Family
    operation: str
    request_model: str | None
    stream: bool
    # An OpenAI-shaped chat stream that did not ask for usage: the sidecar may ask for it.
    usage_opt_in_missing: bool

    def parser(self, content_type: str) -> ResponseParser:
        acc: Accumulator = (
            AnthropicAccumulator() if self.family == "anthropic" else OpenAIAccumulator()
        )
        return ResponseParser(acc, content_type=content_type)


_OPENAI_OPERATIONS = (
    ("/chat/completions", "chat"),
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
    ("/responses", "chat"),
)


def operation_for(provider: str, path: str) -> tuple[Family, str] | None:
    path = path.split("?", 1)[0].rstrip("/")
    if provider == "anthropic":
        return ("anthropic", "chat") if path.endswith("/v1/messages") else None
    for suffix, operation in _OPENAI_OPERATIONS:
        if path.endswith(suffix):
            return "openai", operation
    return None


def detect(provider: str, method: str, path: str, body: bytes) -> CallSpec | None:
    """A request to a known LLM host → the call to meter, or None (e.g. GET /v1/models)."""
    if method.upper() != "POST":
        return None
    found = operation_for(provider, path)
    if found is None:
        return None
    family, operation = found
    req = _json_object(body)
    model = req.get("model")
    stream = req.get("stream") is True
    opts = req.get("stream_options")
    asked = isinstance(opts, dict) and opts.get("include_usage") is True
    return CallSpec(
        provider=provider,
        family=family,
        operation=operation,
        request_model=model if isinstance(model, str) and model else None,
        stream=stream,
        usage_opt_in_missing=(
            stream
            and not asked
            and provider in _USAGE_OPT_IN
            and operation in ("chat", "text_completion")
            and not path.split("?", 1)[0].rstrip("/").endswith("/responses")
        ),
    )


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body) if body else {}
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}
