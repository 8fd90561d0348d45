"""Detection: which host is an LLM endpoint, and what a request path says about the call."""

from __future__ import annotations

import pytest

from podtally.providers.registry import HostTable, detect, provider_for_plain_http


@pytest.mark.parametrize(
    ("host", "provider"),
    [
        ("api.openai.com", "openai"),
        ("API.OpenAI.com.", "openai"),
        ("my-res.openai.azure.com", "azure.ai.openai"),
        ("my-res.cognitiveservices.azure.com", "azure.ai.openai"),
        ("generativelanguage.googleapis.com", "gcp.gemini"),
        ("us-central1-aiplatform.googleapis.com", "gcp.vertex_ai"),
        ("aiplatform.googleapis.com", "gcp.vertex_ai"),
        ("bedrock-runtime.us-east-1.amazonaws.com", "aws.bedrock"),
        ("bedrock-runtime-fips.us-gov-west-1.amazonaws.com", "aws.bedrock"),
        ("bedrock-mantle.us-east-1.api.aws", "aws.bedrock"),
        ("api.deepseek.com", "deepseek"),
        ("api.mistral.ai", "mistral_ai"),
        ("api.groq.com", "groq"),
        ("api.x.ai", "x_ai"),
        ("api.cohere.com", "cohere"),
        ("example.com", None),
        ("openai.com.evil.test", None),
        ("s3.us-east-1.amazonaws.com", None),
        (None, None),
    ],
)
def test_builtin_hosts(host: str | None, provider: str | None) -> None:
    assert HostTable().provider_for(host) == provider


def test_configured_hosts_win_and_globs_work() -> None:
    table = HostTable([("*.llm.internal", "openai_compatible"), ("api.openai.com", "custom")])
    assert table.provider_for("vllm.llm.internal") == "openai_compatible"
    assert table.provider_for("api.openai.com") == "custom"


@pytest.mark.parametrize("entry", ["no-equals", "=openai", "host="])
def test_bad_host_entry(entry: str) -> None:
    with pytest.raises(ValueError, match="HOST=PROVIDER"):
        HostTable.parse_entry(entry)


@pytest.mark.parametrize(
    ("provider", "path", "body", "family", "operation", "model", "stream"),
    [
        ("openai", "/v1/chat/completions", b'{"model":"gpt-4o","stream":true}', "openai", "chat", "gpt-4o", True),
        ("openai", "/v1/responses", b'{"model":"o3"}', "openai", "chat", "o3", False),
        ("openai", "/v1/embeddings", b'{"model":"text-embedding-3-small"}', "openai", "embeddings", "text-embedding-3-small", False),
        ("openai", "/v1/completions", b'{"model":"gpt-3.5-turbo-instruct"}', "openai", "text_completion", "gpt-3.5-turbo-instruct", False),
        ("azure.ai.openai", "/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21", b"{}", "openai", "chat", "my-gpt4o", False),
        ("azure.ai.openai", "/openai/v1/chat/completions", b'{"model":"gpt-4o"}', "openai", "chat", "gpt-4o", False),
        ("gcp.gemini", "/v1beta/models/gemini-2.0-flash:generateContent", b"{}", "gemini", "generate_content", "gemini-2.0-flash", False),
        ("gcp.gemini", "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", b"{}", "gemini", "generate_content", "gemini-2.0-flash", True),
        ("gcp.gemini", "/v1beta/models/text-embedding-004:embedContent", b"{}", "gemini_embed", "embeddings", "text-embedding-004", False),
        ("gcp.gemini", "/v1beta/openai/chat/completions", b'{"model":"gemini-2.0-flash"}', "openai", "chat", "gemini-2.0-flash", False),
        ("gcp.vertex_ai", "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash-001:streamGenerateContent", b"{}", "gemini", "generate_content", "gemini-2.0-flash-001", True),
        ("gcp.vertex_ai", "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-3-5-sonnet-v2@20241022:rawPredict", b"{}", "anthropic", "chat", "claude-3-5-sonnet-v2@20241022", False),
        ("gcp.vertex_ai", "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:streamRawPredict", b"{}", "anthropic", "chat", "claude-sonnet-4@20250514", True),
        # Partner models on Vertex answer rawPredict in their own OpenAI-shaped format.
        ("gcp.vertex_ai", "/v1/projects/p/locations/us-central1/publishers/mistralai/models/mistral-large-2411:rawPredict", b'{"model":"mistral-large-2411"}', "openai", "chat", "mistral-large-2411", False),
        ("gcp.vertex_ai", "/v1/projects/p/locations/us-central1/publishers/mistralai/models/codestral-2501:streamRawPredict", b"{}", "openai", "chat", "codestral-2501", True),
        # Tuned Gemini: a Vertex endpoint, or a Gemini API tunedModel; the response's
        # modelVersion then names the model.
        ("gcp.vertex_ai", "/v1/projects/p/locations/us-central1/endpoints/1234567890:generateContent", b"{}", "gemini", "generate_content", "1234567890", False),
        ("gcp.gemini", "/v1beta/tunedModels/my-tuned-model-abc:streamGenerateContent?alt=sse", b"{}", "gemini", "generate_content", "my-tuned-model-abc", True),
        ("aws.bedrock", "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse", b"{}", "bedrock_converse", "chat", "anthropic.claude-3-haiku-20240307-v1:0", False),
        ("aws.bedrock", "/model/us.anthropic.claude-3-7-sonnet-20250219-v1%3A0/converse-stream", b"{}", "bedrock_converse", "chat", "us.anthropic.claude-3-7-sonnet-20250219-v1:0", True),
        ("aws.bedrock", "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.meta.llama3-2-1b-instruct-v1%3A0/invoke", b"{}", "bedrock_invoke", "chat", "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.meta.llama3-2-1b-instruct-v1:0", False),
        ("aws.bedrock", "/model/anthropic.claude-v2/invoke-with-response-stream", b"{}", "bedrock_invoke", "chat", "anthropic.claude-v2", True),
        # Bedrock's OpenAI-compatible APIs (docs.aws.amazon.com/bedrock/latest/userguide/inference-chat-completions.html).
        ("aws.bedrock", "/openai/v1/chat/completions", b'{"model":"openai.gpt-oss-20b-1:0","stream":true}', "openai", "chat", "openai.gpt-oss-20b-1:0", True),
        ("aws.bedrock", "/v1/responses", b'{"model":"openai.gpt-oss-120b"}', "openai", "chat", "openai.gpt-oss-120b", False),
        ("cohere", "/v2/chat", b'{"model":"command-r-plus","stream":true}', "cohere", "chat", "command-r-plus", True),
        ("cohere", "/v2/embed", b'{"model":"embed-english-v3.0"}', "cohere", "embeddings", "embed-english-v3.0", False),
        ("ollama", "/api/chat", b'{"model":"llama3.2"}', "ollama", "chat", "llama3.2", True),
        ("ollama", "/api/generate", b'{"model":"llama3.2","stream":false}', "ollama", "text_completion", "llama3.2", False),
        ("ollama", "/v1/chat/completions", b'{"model":"llama3.2"}', "openai", "chat", "llama3.2", False),
        ("anthropic", "/v1/messages", b'{"model":"claude-sonnet-4-5","stream":true}', "anthropic", "chat", "claude-sonnet-4-5", True),
        # Anthropic's OpenAI SDK compatibility layer (base_url https://api.anthropic.com/v1/).
        ("anthropic", "/v1/chat/completions", b'{"model":"claude-opus-4-6"}', "openai", "chat", "claude-opus-4-6", False),
        # The Messages API served by others: DeepSeek (base_url https://api.deepseek.com/anthropic,
        # api-docs.deepseek.com/guides/anthropic_api), Claude on Azure Foundry, Ollama.
        ("deepseek", "/anthropic/v1/messages", b'{"model":"deepseek-v4-pro","stream":true}', "anthropic", "chat", "deepseek-v4-pro", True),
        ("azure.ai.openai", "/anthropic/v1/messages", b'{"model":"claude-sonnet-4-5"}', "anthropic", "chat", "claude-sonnet-4-5", False),
        ("ollama", "/v1/messages", b'{"model":"qwen3-coder"}', "anthropic", "chat", "qwen3-coder", False),
    ],
)
def test_routes(provider: str, path: str, body: bytes, family: str, operation: str, model: str, stream: bool) -> None:
    spec = detect(provider, "POST", path, body)
    assert spec is not None
    assert (spec.family, spec.operation, spec.request_model, spec.stream) == (family, operation, model, stream)


@pytest.mark.parametrize(
    ("provider", "method", "path"),
    [
        ("openai", "GET", "/v1/models"),
        ("openai", "POST", "/v1/files"),
        ("anthropic", "POST", "/v1/messages/count_tokens"),
        ("anthropic", "POST", "/v1/messages/batches"),
        ("gcp.gemini", "POST", "/v1beta/models/gemini-2.0-flash:countTokens"),
        ("gcp.vertex_ai", "POST", "/v1/projects/p/locations/us-central1/endpoints/1234567890:rawPredict"),
        ("gcp.vertex_ai", "POST", "/v1/projects/p/locations/us-central1/publishers/google/models/imagen-3.0-generate-002:predict"),
        # Claude's count_tokens on Vertex (partner-models/claude/count-tokens): the model is
        # in the body, the path names the pseudo-model `count-tokens`. Once metered as chat.
        ("gcp.vertex_ai", "POST", "/v1/projects/p/locations/us-east5/publishers/anthropic/models/count-tokens:rawPredict"),
        ("aws.bedrock", "POST", "/model/anthropic.claude-sonnet-4-5-20250929-v1%3A0/count-tokens"),
        ("aws.bedrock", "POST", "/guardrail/g1/version/1/apply"),
        ("openai", "GET", "/v1/chat/completions/chatcmpl-1"),
    ],
)
def test_not_metered(provider: str, method: str, path: str) -> None:
    assert detect(provider, method, path, b"{}") is None


@pytest.mark.parametrize(
    ("provider", "path", "body", "expected"),
    [
        ("openai", "/v1/chat/completions", b'{"stream":true}', True),
        ("openai", "/v1/chat/completions", b'{"stream":true,"stream_options":{"include_usage":true}}', False),
        ("openai", "/v1/chat/completions", b'{"stream":false}', False),
        ("openai", "/v1/responses", b'{"stream":true}', False),
        ("mistral_ai", "/v1/chat/completions", b'{"stream":true}', False),
        ("azure.ai.openai", "/openai/deployments/d/chat/completions?api-version=2024-06-01", b'{"stream":true}', False),
        ("azure.ai.openai", "/openai/deployments/d/chat/completions?api-version=2024-10-21", b'{"stream":true}', True),
        ("azure.ai.openai", "/openai/v1/chat/completions", b'{"stream":true}', True),
    ],
)
def test_usage_opt_in(provider: str, path: str, body: bytes, expected: bool) -> None:
    spec = detect(provider, "POST", path, body)
    assert spec is not None and spec.usage_opt_in_missing is expected


def test_plain_http_provider() -> None:
    assert provider_for_plain_http("ollama.ai.svc", None, "/api/chat") == "ollama"
    assert provider_for_plain_http("10.0.0.7", 11434, "/v1/chat/completions") == "ollama"
    assert provider_for_plain_http("vllm.ml.svc", 8000, "/v1/chat/completions") == "openai_compatible"
