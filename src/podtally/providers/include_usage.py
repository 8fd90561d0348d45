"""Asking an OpenAI chat stream for usage, invisibly to the client.

Upstream, `stream_options.include_usage` is added to the request. Downstream, the two
things that option changes are undone before the client sees them: every chunk gained a
`"usage":null` member, and one extra chunk (empty `choices`, the usage) comes before
`[DONE]`. Everything else passes byte for byte. Whenever a rewrite cannot be proven
exact, the original bytes pass unchanged (fail-open).
"""

from __future__ import annotations

import json
import re
from typing import Any

from podtally.providers.jsonscan import top_level_members

# Bodies above this are scanned, not parsed (a parse costs ~4x the size in memory).
LARGE_BODY = 1 << 20

_INSERT = b'"stream_options":{"include_usage":true}'
_NULL_AFTER = re.compile(rb',[ \t]*"usage"[ \t]*:[ \t]*null(?=[ \t]*[,}])')
_NULL_BEFORE = re.compile(rb'(?<=[{,])[ \t]*"usage"[ \t]*:[ \t]*null[ \t]*,[ \t]*')
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def add_include_usage(body: bytes) -> bytes | None:
    """The request body with include_usage set, or None when it cannot be done safely."""
    if len(body) > LARGE_BODY:
        if not body.lstrip().startswith(b"{"):
            return None
        req = top_level_members(body, ("stream_options",))
        if "stream_options" in req:
            return None  # rare in big bodies: leave them alone rather than re-serialise
        return _insert(body)
    try:
        req = json.loads(body)
    except ValueError:
        return None
    if not isinstance(req, dict):
        return None
    opts = req.get("stream_options")
    if opts is None and "stream_options" not in req:
        return _insert(body)
    if isinstance(opts, dict) or opts is None:
        req["stream_options"] = {**(opts or {}), "include_usage": True}
        return json.dumps(req, separators=(",", ":"), ensure_ascii=False).encode()
    return None


def _insert(body: bytes) -> bytes:
    """After the opening brace: the rest of the body stays byte-identical."""
    start = body.index(b"{") + 1
    sep = b"," if not body[start:].lstrip().startswith(b"}") else b""
    return body[:start] + _INSERT + sep + body[start:]


class UsageChunkStripper:
    """Removes what include_usage added to an SSE stream; holds at most one partial event."""

    def __init__(self) -> None:
        self._pending = b""
        self.stripped_usage_chunk = False

    def feed(self, chunk: bytes) -> bytes:
        buf = self._pending + chunk
        out: list[bytes] = []
        pos = 0
        for m in _EVENT_END.finditer(buf):
            out.append(self._rewrite(buf[pos : m.end()]))
            pos = m.end()
        self._pending = buf[pos:]
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _rewrite(self, event: bytes) -> bytes:
        lines = event.splitlines(keepends=True)
        data = [ln for ln in lines if ln.startswith(b"data:")]
        if len(data) != 1:
            return event
        line = data[0]
        payload = line[5:].strip()
        try:
            obj = json.loads(payload)
        except ValueError:
            return event
        if not isinstance(obj, dict) or "usage" not in obj:
            return event
        if obj["usage"] is not None:
            if obj.get("choices") == []:
                self.stripped_usage_chunk = True
                return b""  # the extra usage-only chunk: the client never asked for it
            return event
        new_line = _NULL_AFTER.sub(b"", line, count=1)
        if new_line == line:
            new_line = _NULL_BEFORE.sub(b"", line, count=1)
        if not _same_without_usage(obj, new_line[5:].strip()):
            return event
        return b"".join(new_line if ln is line else ln for ln in lines)


def _same_without_usage(original: dict[str, Any], rewritten: bytes) -> bool:
    try:
        obj = json.loads(rewritten)
    except ValueError:
        return False
    expected = {k: v for k, v in original.items() if k != "usage"}
    return bool(obj == expected)
