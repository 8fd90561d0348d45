"""Golden tests: real recorded provider responses (see testdata/SOURCES.md) → exact buckets.

Every case is fed whole, in 7-byte slices and byte by byte, so the incremental parsers are
proven independent of how the network splits the stream.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from podtally.providers.registry import HostTable, detect

DATA = Path(__file__).parent / "testdata"
CASES = sorted(p.name.removesuffix(".expected.json") for p in DATA.glob("*.expected.json"))


def _load(case: str) -> tuple[dict, bytes, bytes, str]:
    expected = json.loads((DATA / f"{case}.expected.json").read_text())
    request = (DATA / f"{case}.request.json").read_bytes()
    for suffix, ctype in ((".response.sse", "text/event-stream"), (".response.json", "application/json")):
        path = DATA / f"{case}{suffix}"
        if path.exists():
            return expected, request, path.read_bytes(), ctype
    raise FileNotFoundError(case)


@pytest.mark.parametrize("split", [None, 7, 1], ids=["whole", "7-bytes", "1-byte"])
@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, split: int | None) -> None:
    expected, request, body, ctype = _load(case)
    provider = HostTable().provider_for(expected["host"])
    assert provider == expected["provider"]
    spec = detect(provider, "POST", expected["path"], request)
    assert spec is not None
    assert spec.operation == expected["operation"]
    parser = spec.parser(ctype)
    step = split or len(body)
    for i in range(0, len(body), step):
        parser.feed(body[i : i + step])
    usage = parser.finish()

    assert usage.parse_error is None
    assert usage.model == expected["model"]
    assert usage.service_tier == expected["service_tier"]
    if expected["tokens"] is None:
        assert usage.tokens is None
    else:
        assert usage.tokens is not None
        assert usage.tokens.as_dict() == expected["tokens"]
    if ctype == "text/event-stream":
        assert parser.saw_output


def test_every_case_has_a_source() -> None:
    sources = (DATA / "SOURCES.md").read_text()
    for case in CASES:
        assert case in sources
        assert json.loads((DATA / f"{case}.expected.json").read_text())["source"]
