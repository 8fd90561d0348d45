"""Top-level members of a large JSON object, found without parsing the rest.

A metered body can be tens of MiB (base64 images in a request, a big embeddings batch in a
response); parsing it whole costs about four times its size in memory. The members a meter
needs (`model`, `stream`, `usage`, …) are small, so a regex tokenizer walks the document,
skipping strings in C, and only the wanted values are decoded.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Collection
from typing import Any

_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]:,]')  # strings: an unrolled loop


def top_level_members(
    data: bytes | bytearray, wanted: Collection[str] | None = None, *, max_value: int = 1 << 16
) -> dict[str, Any]:
    """Values of the top-level object's `wanted` keys (every key when None) whose encoded
    value is at most `max_value` bytes; undecodable values are left out."""
    out: dict[str, Any] = {}
    every = _Every() if wanted is None else wanted
    depth = 0
    key: str | None = None
    after_colon = False
    value_start = -1  # where a wanted object/array/string value began; -2: a scalar
    colon_end = 0
    for m in _TOKEN.finditer(data):
        tok = m.group()
        if depth == 1 and after_colon and value_start < 0 and key in every:
            value_start = m.start() if tok[:1] in (b"{", b"[", b'"') else -2
        if tok in (b"{", b"["):
            depth += 1
            if depth == 1 and tok == b"[":
                return out  # not an object
            continue
        if tok in (b"}", b"]"):
            depth -= 1
            if depth == 1 and value_start >= 0 and key is not None:
                _take(out, key, data[value_start : m.end()], max_value)
                key, after_colon, value_start = None, False, -1
            elif depth == 0:
                _scalar(out, key, every, data, after_colon, value_start, colon_end, m.start())
                return out
            continue
        if depth != 1:
            continue
        if tok == b":":
            after_colon, colon_end = True, m.end()
        elif tok == b",":
            _scalar(out, key, every, data, after_colon, value_start, colon_end, m.start())
            key, after_colon, value_start = None, False, -1
        elif after_colon:  # a string value
            if key in every and key is not None:
                _take(out, key, tok, max_value)
            key, after_colon, value_start = None, False, -1
        else:  # a key
            try:
                key = json.loads(tok)
            except ValueError:
                key = None
    return out


class _Every:
    def __contains__(self, key: object) -> bool:
        return True


def _scalar(out: dict[str, Any], key: str | None, wanted: Collection[str] | _Every,
            data: bytes | bytearray, after_colon: bool, value_start: int, start: int,
            end: int) -> None:
    if key in wanted and key is not None and after_colon and value_start == -2:
        _take(out, key, data[start:end].strip(), 64)


def _take(out: dict[str, Any], key: str, raw: bytes | bytearray, max_value: int) -> None:
    if len(raw) > max_value:
        return
    with contextlib.suppress(ValueError):
        out[key] = json.loads(raw)
