"""Golden tests: real recorded provider responses (see testdata/SOURCES.md) → exact buckets.

Every case is fed whole, in 7-byte slices and byte by byte, so the incremental parsers are
proven independent of how the network splits the stream.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from support.eventstream import event, invoke_chunk

from podtally.providers.registry import HostTable, detect, provider_for_plain_http

DATA = Path(__file__).parent / "testdata"
CASES = sorted(p.name.removesuffix(".expected.json") for p in DATA.glob("*.expected.json"))


CONTENT_TYPES = {
    ".response.sse": "text/event-stream",
    ".response.json": "application/json",
    ".response.jsonarray": "application/json",
    ".response.ndjson": "application/x-ndjson",
    ".response.eventstream.b64": "application/vnd.amazon.eventstream",
    ".events.json": "application/vnd.amazon.eventstream",
}


def _body(case: str) -> tuple[bytes, str]:
    for suffix, ctype in CONTENT_TYPES.items():
        path = DATA / f"{case}{suffix}"
        if not path.exists():
            continue
        if suffix == ".response.eventstream.b64":
            return base64.b64decode(path.read_text()), ctype
        if suffix == ".events.json":
            # Decoded event sequences re-framed as AWS event-stream (see SOURCES.md).
            return b"".join(
                invoke_chunk(e["payload"]) if e["event_type"] == "chunk"
                else event(e["event_type"], e["payload"])
                for e in json.loads(path.read_text())
            ), ctype
        return path.read_bytes(), ctype
    raise FileNotFoundError(case)


def _load(case: str) -> tuple[dict, bytes, bytes, str]:
    expected = json.loads((DATA / f"{case}.expected.json").read_text())
    req_path = DATA / f"{case}.request.json"
    request = req_path.read_bytes() if req_path.exists() else b"{}"
    body, ctype = _body(case)
    return expected, request, body, ctype


def _provider(host: str, path: str) -> str | None:
    name, _, port = host.partition(":")
    return HostTable().provider_for(name) or provider_for_plain_http(
        name, int(port) if port else None, path)


@pytest.mark.parametrize("split", [None, 7, 1], ids=["whole", "7-bytes", "1-byte"])
@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, split: int | None) -> None:
    expected, request, body, ctype = _load(case)
    provider = _provider(expected["host"], expected["path"])
    assert provider == expected["provider"]
    spec = detect(provider, "POST", expected["path"], request)
    assert spec is not None
    assert spec.operation == expected["operation"]
    parser = spec.parser(ctype, {k.lower(): v for k, v in expected.get("headers", {}).items()})
    step = split or len(body)
    for i in range(0, len(body), step):
        parser.feed(body[i : i + step])
    usage = parser.finish()

    assert usage.parse_error is None
    assert (usage.model or spec.request_model) == expected["model"]
    assert usage.service_tier == expected["service_tier"]
    if expected["tokens"] is None:
        assert usage.tokens is None
    else:
        assert usage.tokens is not None
        assert usage.tokens.as_dict() == expected["tokens"]
        if "reported_total" in expected:  # the provider's own total: the buckets are disjoint
            assert usage.tokens.total == expected["reported_total"]
    if parser.streaming and expected["tokens"] is not None:
        assert parser.saw_output


def test_every_case_has_a_source() -> None:
    sources = (DATA / "SOURCES.md").read_text()
    for case in CASES:
        assert case in sources
        assert json.loads((DATA / f"{case}.expected.json").read_text())["source"]
