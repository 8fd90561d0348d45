"""Real usage objects whose whole response was not recorded (see testdata/SOURCES.md,
"Usage excerpts") → exact buckets, through the same parsers as a whole response.

An excerpt is the part of a real response that carries the counts, byte for byte where the
source allows it. There is no request, so nothing is routed: the accumulator is the one the
provider family's route would pick. Fed whole and byte by byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from podtally.providers.registry import CallSpec

DATA = Path(__file__).parent / "testdata"
CASES = sorted(p.name.removesuffix(".expected-usage.json")
               for p in DATA.glob("*.expected-usage.json"))
CONTENT_TYPES = {".excerpt.json": "application/json", ".excerpt.sse": "text/event-stream"}


def _body(case: str) -> tuple[bytes, str]:
    for suffix, ctype in CONTENT_TYPES.items():
        path = DATA / f"{case}{suffix}"
        if path.exists():
            return path.read_bytes(), ctype
    raise FileNotFoundError(case)


@pytest.mark.parametrize("split", [None, 1], ids=["whole", "1-byte"])
@pytest.mark.parametrize("case", CASES)
def test_usage_excerpt(case: str, split: int | None) -> None:
    expected = json.loads((DATA / f"{case}.expected-usage.json").read_text())
    body, ctype = _body(case)
    spec = CallSpec(expected["provider"], expected["family"], "chat", None, stream=False)
    parser = spec.parser(ctype)
    step = split or len(body)
    for i in range(0, len(body), step):
        parser.feed(body[i : i + step])
    usage = parser.finish()

    assert usage.parse_error is None
    assert usage.model == expected["model"]
    assert usage.service_tier == expected["service_tier"]
    assert usage.tokens is not None
    assert usage.tokens.as_dict() == expected["tokens"]
    if "reported_total" in expected:
        assert usage.tokens.total == expected["reported_total"]


def test_every_excerpt_has_a_source() -> None:
    sources = (DATA / "SOURCES.md").read_text()
    for case in CASES:
        assert case in sources
        assert json.loads((DATA / f"{case}.expected-usage.json").read_text())["source"]
