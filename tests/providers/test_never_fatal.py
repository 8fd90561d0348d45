"""Unknown or odd values never stop metering: every golden body, with each of its members
(to depth 3) replaced in turn by a value of another JSON type, still parses to a result.

The parsers may count nothing for a mangled member; they must not raise, since a raise
loses the whole call's usage at the hook boundary, and no bucket may come out negative,
since the buckets feed Prometheus counters, which refuse to go down.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from podtally.providers.registry import detect
from podtally.providers.sse import SSEDecoder

from .test_golden import CASES, _load, _provider

ODD: tuple[Any, ...] = (None, "x", [], {}, -1, 1.5, True, [1], {"a": 1})
DEPTH = 3
Path = tuple[str | int, ...]


def _paths(obj: Any, path: Path = ()) -> Iterator[Path]:
    if path:
        yield path
    if len(path) >= DEPTH:
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths(value, (*path, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj[:3]):
            yield from _paths(value, (*path, i))


def _replaced(obj: Any, path: Path, value: Any) -> Any:
    copy = json.loads(json.dumps(obj))
    cur = copy
    for key in path[:-1]:
        cur = cur[key]
    cur[path[-1]] = value
    return copy


def _variants(body: bytes, ctype: str) -> Iterator[bytes]:
    if ctype == "text/event-stream":
        events = [e.data for e in SSEDecoder().feed(body)]
        # The first events and the last ones carry the model, ids and usage.
        for i in sorted({0, 1, len(events) - 2, len(events) - 1} & set(range(len(events)))):
            try:
                obj = json.loads(events[i])
            except ValueError:
                continue
            for path in _paths(obj):
                for value in ODD:
                    mangled = list(events)
                    mangled[i] = json.dumps(_replaced(obj, path, value))
                    yield b"".join(b"data: " + e.encode() + b"\n\n" for e in mangled)
    elif ctype == "application/x-ndjson":
        lines = body.splitlines()
        for i in (0, len(lines) - 1):  # the first line has the model, the last the counts
            obj = json.loads(lines[i])
            for path in _paths(obj):
                for value in ODD:
                    mangled = list(lines)
                    mangled[i] = json.dumps(_replaced(obj, path, value)).encode()
                    yield b"\n".join(mangled) + b"\n"
    elif ctype == "application/json":
        obj = json.loads(body)
        for path in _paths(obj):
            for value in ODD:
                yield json.dumps(_replaced(obj, path, value)).encode()


@pytest.mark.parametrize("case", CASES)
def test_odd_values_are_never_fatal(case: str) -> None:
    expected, request, body, ctype = _load(case)
    spec = detect(_provider(expected["host"], expected["path"]), "POST", expected["path"], request)
    assert spec is not None
    n = 0
    for variant in _variants(body, ctype):
        parser = spec.parser(ctype)
        parser.feed(variant)
        usage = parser.finish()
        if usage.tokens is not None:  # counters only go up: no bucket may be negative
            assert min(usage.tokens.as_dict().values()) >= 0, usage.tokens
        n += 1
    if ctype != "application/vnd.amazon.eventstream":
        assert n > 0
