"""Incremental Content-Encoding decoders: the meter reads a decoded copy, the client gets
the bytes as sent."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import brotli
import zstandard

Decoder = Callable[[bytes], bytes]


def decoder_for(content_encoding: str) -> Decoder | None:
    """A decoder for the header's value, identity (no-op) for none, None if unsupported."""
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return _identity
    if len(codings) > 1:
        return None  # stacked encodings: real LLM APIs never send them
    coding = codings[0]
    if coding in ("gzip", "x-gzip"):
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress
    if coding == "deflate":
        return _Deflate()
    if coding == "br":
        return brotli.Decompressor().process  # type: ignore[no-any-return]
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress
    return None


def _identity(data: bytes) -> bytes:
    return data


class _Deflate:
    """HTTP "deflate" is meant to be zlib-wrapped, but raw deflate is common in the wild."""

    def __init__(self) -> None:
        self._obj: zlib._Decompress | None = None
        self._head = b""

    def __call__(self, data: bytes) -> bytes:
        if self._obj is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            cmf_flg = int.from_bytes(self._head[:2], "big")
            zlib_wrapped = (self._head[0] & 0x0F) == 8 and cmf_flg % 31 == 0
            self._obj = zlib.decompressobj(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
            data, self._head = self._head, b""
        return self._obj.decompress(data)
