"""Builds AWS event-stream messages for tests (string headers only). The code under test
decodes them with botocore's parser, which checks both CRCs, so a wrong builder fails."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from typing import Any


def message(headers: dict[str, str], payload: bytes) -> bytes:
    hbytes = b"".join(
        struct.pack("!B", len(k)) + k.encode() + b"\x07" + struct.pack("!H", len(v)) + v.encode()
        for k, v in headers.items()
    )
    total = 12 + len(hbytes) + len(payload) + 4
    prelude = struct.pack("!II", total, len(hbytes))
    prelude += struct.pack("!I", zlib.crc32(prelude))
    body = prelude + hbytes + payload
    return body + struct.pack("!I", zlib.crc32(body))


def event(event_type: str, payload: dict[str, Any]) -> bytes:
    return message({":event-type": event_type, ":content-type": "application/json",
                    ":message-type": "event"}, json.dumps(payload).encode())


def invoke_chunk(inner: dict[str, Any]) -> bytes:
    """An InvokeModelWithResponseStream `chunk` event wrapping a model-native object."""
    return event("chunk", {"bytes": base64.b64encode(json.dumps(inner).encode()).decode()})


def exception(kind: str, message_text: str) -> bytes:
    return message({":exception-type": kind, ":content-type": "application/json",
                    ":message-type": "exception"}, json.dumps({"message": message_text}).encode())
