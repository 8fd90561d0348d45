"""include_usage added upstream and undone downstream, on a real recorded stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.payloads import without_usage

from podtally.providers.include_usage import UsageChunkStripper, add_include_usage

DATA = Path(__file__).parent / "testdata"


def test_insert_keeps_the_rest_of_the_body() -> None:
    body = b'{"model": "gpt-4o-mini", "stream": true, "messages": []}'
    out = add_include_usage(body)
    assert out == b'{"stream_options":{"include_usage":true},"model": "gpt-4o-mini", "stream": true, "messages": []}'
    assert json.loads(out)["stream_options"] == {"include_usage": True}


def test_existing_stream_options_are_merged() -> None:
    out = add_include_usage(b'{"stream":true,"stream_options":{"include_obfuscation":false}}')
    assert out is not None
    assert json.loads(out)["stream_options"] == {"include_obfuscation": False, "include_usage": True}


@pytest.mark.parametrize("body", [b"not json", b"[1,2]", b'{"stream_options": "weird"}'])
def test_unsafe_bodies_are_left_alone(body: bytes) -> None:
    assert add_include_usage(body) is None




@pytest.mark.parametrize("step", [1, 5, 64, 100_000])
def test_stripped_stream_is_what_the_client_would_have_got(step: int) -> None:
    stream = (DATA / "openai-chat-stream-usage.response.sse").read_bytes()
    stripper = UsageChunkStripper()
    out = b"".join(stripper.feed(stream[i : i + step]) for i in range(0, len(stream), step))
    out += stripper.flush()
    assert stripper.stripped_usage_chunk
    assert out == without_usage(stream)
    assert b'"usage"' not in out
    assert out.endswith(b"data: [DONE]\n\n")


def test_usage_key_first_and_spaces() -> None:
    stripper = UsageChunkStripper()
    out = stripper.feed(b'data: {"usage": null, "choices": [{"delta": {"content": "x"}}]}\n\n')
    assert out == b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'


def test_usage_text_inside_content_is_not_touched() -> None:
    event = b'data: {"choices":[{"delta":{"content":"\\"usage\\":null,"}}],"usage":null}\n\n'
    out = UsageChunkStripper().feed(event)
    assert out == b'data: {"choices":[{"delta":{"content":"\\"usage\\":null,"}}]}\n\n'


def test_unparseable_events_pass_unchanged() -> None:
    stripper = UsageChunkStripper()
    assert stripper.feed(b"data: {broken\n\n: keepalive\n\n") == b"data: {broken\n\n: keepalive\n\n"
    assert stripper.feed(b"data: partial") == b""
    assert stripper.flush() == b"data: partial"
