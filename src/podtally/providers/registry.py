"""Which connections are LLM traffic, and which parser meters a request.

Two questions, both pure: `HostTable.provider_for(host)` decides at TLS ClientHello time
whether a connection is decrypted at all; `detect(...)` decides, per HTTP request, whether
it is a metered LLM call, of which operation and model, and how to read its response.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote

from podtally.providers.anthropic import AnthropicAccumulator
from podtally.providers.base import Accumulator, ResponseParser
from podtally.providers.bedrock import ConverseAccumulator, InvokeAccumulator
from podtally.providers.cohere import CohereAccumulator
from podtally.providers.gemini import GeminiAccumulator, GeminiEmbeddingAccumulator
from podtally.providers.jsonscan import top_level_members
from podtally.providers.ollama import OllamaAccumulator
from podtally.providers.openai import OpenAIAccumulator
from podtally.providers.openai_batch import BatchOutputAccumulator

Family = Literal[
    "openai", "anthropic", "gemini", "gemini_embed", "bedrock_converse", "bedrock_invoke",
    "cohere", "ollama", "openai_batch",
]

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
    ("bedrock-mantle.*.api.aws", "aws.bedrock"),  # Bedrock's OpenAI-compatible endpoint
    ("api.deepseek.com", "deepseek"),
    ("api.mistral.ai", "mistral_ai"),
    ("api.groq.com", "groq"),
    ("api.x.ai", "x_ai"),
    ("api.cohere.com", "cohere"),
    ("api.cohere.ai", "cohere"),
)

# Providers whose chat streams carry usage only when asked (stream_options.include_usage)
# and that accept the option. (Mistral, xAI and Groq report usage unasked.)
_USAGE_OPT_IN = frozenset({"openai", "openai_compatible", "azure.ai.openai", "deepseek",
                           "ollama"})
# Azure rejects stream_options before this api-version ("Unrecognized request argument").
_AZURE_STREAM_OPTIONS_SINCE = "2024-09-01"
_API_VERSION = re.compile(r"[?&]api-version=([0-9-]+)")
OLLAMA_PORT = 11434


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

    def exact_hosts(self) -> dict[str, str]:
        """The names without wildcards → provider (what can be resolved to addresses)."""
        return dict(self._exact)

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
    usage_opt_in_missing: bool = False

    def parser(
        self, content_type: str, headers: Mapping[str, str] | None = None
    ) -> ResponseParser:
        if self.family == "openai_batch":
            content_type = "application/x-ndjson"  # served as octet-stream, read as JSONL
        return ResponseParser(_ACCUMULATORS[self.family](self), content_type=content_type,
                              headers=headers)


_ACCUMULATORS: dict[str, Callable[[CallSpec], Accumulator]] = {
    "openai": lambda spec: OpenAIAccumulator(
        reasoning_in_completion=spec.provider != "x_ai"),
    "openai_batch": lambda spec: BatchOutputAccumulator(),
    "anthropic": lambda spec: AnthropicAccumulator(),
    "gemini": lambda spec: GeminiAccumulator(),
    "gemini_embed": lambda spec: GeminiEmbeddingAccumulator(),
    "bedrock_converse": lambda spec: ConverseAccumulator(),
    "bedrock_invoke": lambda spec: InvokeAccumulator(spec.request_model or ""),
    "cohere": lambda spec: CohereAccumulator(),
    "ollama": lambda spec: OllamaAccumulator(),
}


@dataclass(frozen=True)
class Route:
    """What a request path says: family, operation, model in the path, stream by path."""

    family: Family
    operation: str
    path_model: str | None = None
    stream: bool | None = None  # None: the request body's "stream" decides


_OPENAI_SUFFIXES = (
    ("/chat/completions", "chat"),
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
    ("/responses", "chat"),
)
_AZURE_DEPLOYMENT = re.compile(r"/openai/deployments/([^/]+)/")
_FILE_CONTENT = re.compile(r"/files/[^/]+/content$")
# Gemini API and Vertex: .../models/{model}:{method}; also tuned models (Gemini API
# tunedModels/{id}, Vertex endpoints/{id}), whose response names the base model.
_GOOGLE_MODEL = re.compile(r"/(?:models|tunedModels|endpoints)/([^/:]+):([A-Za-z]+)$")
_GEMINI_METHODS: dict[str, tuple[Family, str, bool]] = {
    "generateContent": ("gemini", "generate_content", False),
    "streamGenerateContent": ("gemini", "generate_content", True),
    "embedContent": ("gemini_embed", "embeddings", False),
    "batchEmbedContents": ("gemini_embed", "embeddings", False),
}
# Vertex serves Claude's token counting as a pseudo-model; the real model is in the body.
_VERTEX_ANTHROPIC_COUNT_TOKENS = "count-tokens"
_BEDROCK = re.compile(
    r"^/model/(.+)/(converse|converse-stream|invoke|invoke-with-response-stream)$"
)
_OLLAMA_NATIVE = {"/api/chat": "chat", "/api/generate": "text_completion",
                  "/api/embed": "embeddings", "/api/embeddings": "embeddings"}


def _openai_route(path: str) -> Route | None:
    for suffix, operation in _OPENAI_SUFFIXES:
        if path.endswith(suffix):
            m = _AZURE_DEPLOYMENT.search(path)
            return Route("openai", operation, m.group(1) if m else None)
    return None


def route_for(provider: str, path: str) -> Route | None:
    """The route of a request path for a provider, or None if it is not a metered call."""
    path = path.split("?", 1)[0].rstrip("/")
    if path.endswith("/v1/messages"):
        # The Messages API wherever it is served: Anthropic, and the Anthropic-compatible
        # endpoints of others (DeepSeek's /anthropic, Claude on Azure Foundry, Ollama, vLLM).
        return Route("anthropic", "chat")
    if provider == "anthropic":
        return _openai_route(path)  # Anthropic's OpenAI SDK compatibility (/v1/chat/completions)
    if provider in ("gcp.gemini", "gcp.vertex_ai"):
        m = _GOOGLE_MODEL.search(path)
        if m:
            model, method = m.group(1), m.group(2)
            if "/publishers/" in path and method in ("rawPredict", "streamRawPredict"):
                stream = method == "streamRawPredict"
                if "/publishers/anthropic/" in path:
                    if model == _VERTEX_ANTHROPIC_COUNT_TOKENS:
                        return None  # Anthropic's /v1/messages/count_tokens on Vertex: not billed
                    return Route("anthropic", "chat", unquote(model), stream)
                if "/publishers/google/" not in path:
                    # Partner models (Mistral, AI21) take and return their own chat
                    # completions, OpenAI-shaped.
                    return Route("openai", "chat", unquote(model), stream)
                return None
            if method in _GEMINI_METHODS:
                family, operation, stream = _GEMINI_METHODS[method]
                return Route(family, operation, unquote(model), stream)
            return None
        return _openai_route(path)  # Gemini's and Vertex's OpenAI-compatible endpoints
    if provider == "aws.bedrock":
        m = _BEDROCK.match(path)
        if not m:
            # OpenAI-compatible Chat Completions and Responses, on bedrock-runtime
            # (/openai/v1/..., /v1/...) and on bedrock-mantle.
            return _openai_route(path)
        model, api = unquote(m.group(1)), m.group(2)
        kind: Family = "bedrock_converse" if api.startswith("converse") else "bedrock_invoke"
        return Route(kind, "chat", model, api.endswith("stream"))
    if provider == "cohere":
        if path.endswith(("/v2/chat", "/v1/chat")):
            return Route("cohere", "chat")
        if path.endswith(("/v2/embed", "/v1/embed")):
            return Route("cohere", "embeddings", stream=False)
        return _openai_route(path) if "/compatibility/" in path else None
    if path in _OLLAMA_NATIVE:
        return Route("ollama", _OLLAMA_NATIVE[path])
    return _openai_route(path)


def provider_for_plain_http(host: str, port: int | None, path: str) -> str:
    """The provider of a plain-HTTP LLM call to a host not in the table (vLLM, Ollama…)."""
    if path.split("?", 1)[0].rstrip("/") in _OLLAMA_NATIVE or port == OLLAMA_PORT:
        return "ollama"
    return "openai_compatible"


def operation_for(provider: str, path: str, method: str = "POST") -> str | None:
    """The operation of a request, or None when it is not metered (decides buffering)."""
    if method.upper() == "GET":
        spec = detect(provider, method, path, b"")
        return spec.operation if spec else None
    route = route_for(provider, path)
    return route.operation if route else None


def detect(provider: str, method: str, path: str, body: bytes) -> CallSpec | None:
    """A request to a known LLM host → the call to meter, or None (e.g. GET /v1/models)."""
    if method.upper() == "GET" and provider in ("openai", "azure.ai.openai"):
        if _FILE_CONTENT.search(path.split("?", 1)[0]):
            return CallSpec(provider, "openai_batch", "batch", None, stream=True)
        return None
    if method.upper() != "POST":
        return None
    route = route_for(provider, path)
    if route is None:
        return None
    req = _json_object(body)
    model = req.get("model")
    body_model = model if isinstance(model, str) and model else None
    if route.stream is not None:
        stream = route.stream
    elif route.family == "ollama":
        stream = req.get("stream") is not False  # Ollama streams unless told not to
    else:
        stream = req.get("stream") is True
    opts = req.get("stream_options")
    asked = isinstance(opts, dict) and opts.get("include_usage") is True
    return CallSpec(
        provider=provider,
        family=route.family,
        operation=route.operation,
        request_model=route.path_model or body_model,
        stream=stream,
        usage_opt_in_missing=(
            stream
            and not asked
            and route.family == "openai"
            and provider in _USAGE_OPT_IN
            and route.operation in ("chat", "text_completion")
            and not path.split("?", 1)[0].rstrip("/").endswith("/responses")
            and (provider != "azure.ai.openai" or _azure_accepts_stream_options(path))
        ),
    )


def _azure_accepts_stream_options(path: str) -> bool:
    if "/openai/v1/" in path:
        return True
    m = _API_VERSION.search(path)
    return m is not None and m.group(1) >= _AZURE_STREAM_OPTIONS_SINCE


# Request bodies above this are scanned for the few members detection reads, not parsed.
LARGE_BODY = 1 << 20


def _json_object(body: bytes) -> dict[str, Any]:
    if len(body) > LARGE_BODY:
        return top_level_members(body, ("model", "stream", "stream_options"))
    try:
        obj = json.loads(body) if body else {}
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}
