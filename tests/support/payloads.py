"""Recorded payloads (tests/providers/testdata) and what tests derive from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent.parent / "providers" / "testdata"


def payload(name: str) -> bytes:
    return (DATA / name).read_bytes()


def expected(case: str) -> dict[str, Any]:
    return dict(json.loads((DATA / f"{case}.expected.json").read_text()))


def without_usage(stream: bytes) -> bytes:
    """What an OpenAI chat stream is when include_usage was not asked for, derived
    independently of the sidecar: no usage-only chunk, no `"usage":null` member elsewhere."""
    out = []
    for event in stream.split(b"\n\n"):
        if not event:
            continue
        data = event.removeprefix(b"data: ")
        if data != b"[DONE]":
            obj = json.loads(data)
            if obj.get("usage") is not None:
                continue
            obj.pop("usage", None)
            data = json.dumps(obj, separators=(",", ":")).encode()
        out.append(b"data: " + data + b"\n\n")
    return b"".join(out)
