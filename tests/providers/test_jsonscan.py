"""Large bodies: the few members a meter needs, found without parsing the whole document."""

from __future__ import annotations

import json

import pytest

from podtally.providers.framing import LARGE_JSON_BODY, JSONFramer
from podtally.providers.include_usage import LARGE_BODY, add_include_usage
from podtally.providers.jsonscan import top_level_members
from podtally.providers.registry import detect


def test_only_top_level_members() -> None:
    doc = {
        "messages": [{"content": 'say "model": "x" {[', "tools": [{"model": "nested"}]}],
        "model": "gpt-4o", "stream": True, "n": 3, "temperature": 0.5, "stop": None,
        "usage": {"prompt_tokens": 1},
    }
    data = json.dumps(doc).encode()
    assert top_level_members(data, {"model", "stream", "n", "temperature", "stop", "usage", "missing"}) == {
        "model": "gpt-4o", "stream": True, "n": 3, "temperature": 0.5, "stop": None,
        "usage": {"prompt_tokens": 1},
    }


def test_every_small_member_and_size_cap() -> None:
    data = json.dumps({"data": ["x" * 200_000], "model": "m", "usage": {"a": 1}}).encode()
    assert top_level_members(data) == {"model": "m", "usage": {"a": 1}}


@pytest.mark.parametrize("data", [b"[1, 2]", b"", b"not json", b'{"model": '])
def test_no_object_no_members(data: bytes) -> None:
    assert "model" not in top_level_members(data, {"model"})


def _big_request(**extra: object) -> bytes:
    image = "data:image/png;base64," + "A" * (LARGE_BODY + 10)
    return json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}]}], "model": "gpt-4o", **extra}).encode()


def test_large_request_detection_and_usage_insertion() -> None:
    body = _big_request(stream=True)
    spec = detect("openai", "POST", "/v1/chat/completions", body)
    assert spec is not None and spec.request_model == "gpt-4o" and spec.usage_opt_in_missing
    out = add_include_usage(body)
    assert out is not None and json.loads(out)["stream_options"] == {"include_usage": True}
    assert out.endswith(body[1:])
    assert add_include_usage(_big_request(stream=True, stream_options={"include_obfuscation": False})) is None


def test_large_response_body_is_scanned() -> None:
    body = json.dumps({"object": "list", "data": [{"embedding": [0.1] * (LARGE_JSON_BODY // 4)}],
                       "model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}}).encode()
    assert len(body) > LARGE_JSON_BODY
    framer = JSONFramer()
    items = list(framer.feed(body)) + list(framer.close())
    assert items == [("", {"object": "list", "model": "text-embedding-3-small",
                           "usage": {"prompt_tokens": 8, "total_tokens": 8}})]
