"""The framers on their edge cases, fed in every split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.eventstream import event, exception, invoke_chunk

from podtally.providers.framing import (
    EventStreamFramer,
    Framer,
    JSONFramer,
    NDJSONFramer,
    framer_for,
)
from podtally.providers.registry import detect


def run(framer: Framer, data: bytes, step: int) -> list[tuple[str, dict]]:
    out = []
    for i in range(0, len(data), step):
        out.extend(framer.feed(data[i : i + step]))
    out.extend(framer.close())
    return out


STEPS = [1, 2, 7, 64, 1_000_000]


@pytest.mark.parametrize("step", STEPS)
def test_json_array_streamed_element_by_element(step: int) -> None:
    elems = [{"a": 1, "s": "x}]\\\"{["}, {"b": [1, {"c": 2}]}, {"usageMetadata": {"promptTokenCount": 3}}]
    data = b"[" + b",\r\n".join(json.dumps(e).encode() for e in elems) + b"]"
    framer = JSONFramer()
    assert run(framer, data, step) == [("", e) for e in elems]
    assert framer.bad == 0 and framer.error is None


def test_json_array_yields_before_the_array_ends() -> None:
    framer = JSONFramer()
    assert list(framer.feed(b'[{"a": 1},')) == [("", {"a": 1})]
    assert list(framer.feed(b' {"b"')) == []


@pytest.mark.parametrize("step", STEPS)
def test_json_object_body(step: int) -> None:
    data = b'  {"usage": {"prompt_tokens": 5}, "text": "[{not an array"}'
    assert run(JSONFramer(), data, step) == [("", json.loads(data))]


def test_json_malformed_is_counted_not_raised() -> None:
    framer = JSONFramer()
    assert run(framer, b'{"a": 1', 3) == []
    assert framer.bad == 1


@pytest.mark.parametrize("step", STEPS)
def test_ndjson(step: int) -> None:
    data = b'{"a":1}\n\n{"b":2}\r\nnot json\n{"c":3}'
    framer = NDJSONFramer()
    assert run(framer, data, step) == [("", {"a": 1}), ("", {"b": 2}), ("", {"c": 3})]
    assert framer.bad == 1


@pytest.mark.parametrize("step", STEPS)
def test_event_stream_converse_and_invoke_chunks(step: int) -> None:
    data = (
        event("messageStart", {"role": "assistant"})
        + event("metadata", {"usage": {"inputTokens": 10, "outputTokens": 4}})
        + invoke_chunk({"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": 10}})
    )
    framer = EventStreamFramer()
    assert run(framer, data, step) == [
        ("messageStart", {"role": "assistant"}),
        ("metadata", {"usage": {"inputTokens": 10, "outputTokens": 4}}),
        ("chunk", {"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": 10}}),
    ]
    assert framer.error is None


def test_event_stream_exception_is_reported() -> None:
    framer = EventStreamFramer()
    data = event("messageStart", {"role": "assistant"}) + exception("throttlingException", "slow down")
    assert run(framer, data, 5) == [("messageStart", {"role": "assistant"})]
    assert framer.error == "provider stream error: throttlingException"


def test_event_stream_corruption_stops_parsing_without_raising() -> None:
    good = event("metadata", {"usage": {"inputTokens": 1}})
    bad = bytearray(event("metadata", {"usage": {"inputTokens": 2}}))
    bad[-1] ^= 0xFF  # message CRC no longer matches
    framer = EventStreamFramer()
    assert run(framer, good + bytes(bad) + good, 4) == [("metadata", {"usage": {"inputTokens": 1}})]
    assert framer.error is not None and "event-stream" in framer.error


@pytest.mark.parametrize(
    ("ctype", "kind", "streaming"),
    [
        ("text/event-stream; charset=utf-8", "SSEFramer", True),
        ("application/x-ndjson", "NDJSONFramer", True),
        ("application/stream+json", "NDJSONFramer", True),
        ("application/vnd.amazon.eventstream", "EventStreamFramer", True),
        ("application/json; charset=UTF-8", "JSONFramer", False),
        ("", "JSONFramer", False),
    ],
)
def test_framer_for(ctype: str, kind: str, streaming: bool) -> None:
    framer, is_stream = framer_for(ctype)
    assert type(framer).__name__ == kind and is_stream is streaming


# Recorded streams (see testdata/SOURCES.md) served under a JSON or missing Content-Type, as
# some gateways do: the body is no JSON document, so it is read as the stream it is.
@pytest.mark.parametrize("ctype", ["application/json", "", "text/plain"])
@pytest.mark.parametrize(
    ("case", "provider", "path"),
    [
        ("openai-chat-stream-usage", "openai", "/v1/chat/completions"),
        ("anthropic-cache-read-stream", "anthropic", "/v1/messages"),
        ("ollama-chat-stream", "ollama", "/api/chat"),
    ],
)
def test_mislabelled_stream_is_still_metered(case: str, provider: str, path: str, ctype: str) -> None:
    data = Path(__file__).parent / "testdata"
    body = next(data.glob(f"{case}.response.*")).read_bytes()
    request = data / f"{case}.request.json"
    expected = json.loads((data / f"{case}.expected.json").read_text())
    spec = detect(provider, "POST", path, request.read_bytes() if request.exists() else b"{}")
    assert spec is not None
    for step in (7, len(body)):
        parser = spec.parser(ctype)
        for i in range(0, len(body), step):
            parser.feed(body[i : i + step])
        usage = parser.finish()
        assert usage.parse_error is None
        assert usage.tokens is not None and usage.tokens.as_dict() == expected["tokens"]


def test_a_malformed_json_body_is_still_counted_bad() -> None:
    framer = JSONFramer()
    assert run(framer, b'{"a": 1}\n{"b": ', 1_000_000) == []
    assert framer.bad == 1
