"""The incremental SSE decoder on the edge cases of the WHATWG event-stream spec."""

from __future__ import annotations

import pytest

from podtally.providers.sse import Event, SSEDecoder


def decode(stream: bytes, step: int | None = None) -> list[Event]:
    dec = SSEDecoder()
    step = step or len(stream) or 1
    events: list[Event] = []
    for i in range(0, len(stream), step):
        events.extend(dec.feed(stream[i : i + step]))
    events.extend(dec.close())
    return events


@pytest.mark.parametrize("step", [None, 1, 2, 3])
@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        pytest.param(b"data: a\n\n", [Event("message", "a")], id="lf"),
        pytest.param(b"data: a\r\n\r\n", [Event("message", "a")], id="crlf"),
        pytest.param(b"data: a\r\rdata: b\r\r", [Event("message", "a"), Event("message", "b")], id="cr"),
        pytest.param(b"data: a\ndata: b\n\n", [Event("message", "a\nb")], id="multi-line-data"),
        pytest.param(b"event: ping\ndata: x\n\n", [Event("ping", "x")], id="named-event"),
        pytest.param(b": comment\ndata: x\n\n", [Event("message", "x")], id="comment"),
        pytest.param(b"data:x\n\n", [Event("message", "x")], id="no-space"),
        pytest.param(b"data:  x\n\n", [Event("message", " x")], id="only-one-space-stripped"),
        pytest.param(b"data\n\n", [Event("message", "")], id="field-without-colon"),
        pytest.param(b"id: 1\nretry: 5\n\n", [], id="no-data-no-event"),
        pytest.param(b"event: x\n\ndata: y\n\n", [Event("message", "y")], id="event-name-reset"),
        pytest.param(b"\xef\xbb\xbfdata: a\n\n", [Event("message", "a")], id="bom"),
        pytest.param(b"data: a\n\ndata: unterminated", [Event("message", "a")], id="unterminated-dropped"),
        pytest.param("data: héllo ✓\n\n".encode(), [Event("message", "héllo ✓")], id="utf8-split"),
        pytest.param(b"foo: bar\ndata: a\n\n", [Event("message", "a")], id="unknown-field"),
    ],
)
def test_spec_edge_cases(stream: bytes, expected: list[Event], step: int | None) -> None:
    assert decode(stream, step) == expected


def test_bom_only_stripped_at_start() -> None:
    assert decode(b"data: a\n\n\xef\xbb\xbfdata: b\n\n") == [Event("message", "a")]
