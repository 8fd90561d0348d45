"""Where to put the uprobes so that they are cheap: a little x86-64 machine code, read.

A uprobe traps on an int3 at the probed instruction; the kernel then either emulates that
instruction (push, call, jmp, …) or single-steps a copy of it out of line, a second trap.
OpenSSL 3's public `SSL_write_ex` and `SSL_read_ex` begin with `sub $n,%rsp`, which is
single-stepped; on a virtual machine the second trap costs ~10 µs (measured: `make bench`).
Both are thin wrappers, `sub $n,%rsp; call <internal>`, around ssl_write_internal and
ssl_read_internal(SSL *s, void *buf, size_t num, size_t *bytes), which `SSL_write` and
`SSL_read` call too, and which begin with `push` — emulated. Probing the internal functions
(entry and return) sees every SSL_write/SSL_read(_ex) call, once, for a single trap.

Pure: bytes in, addresses out. Anything that does not match exactly gives None, and the
agent probes the public symbols instead.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

_ELF64_LE = b"\x7fELF\x02\x01"
PT_LOAD = 1


@dataclass(frozen=True)
class Segment:
    vaddr: int
    offset: int
    filesz: int


def load_segments(f: BinaryIO) -> list[Segment]:
    """The PT_LOAD segments of a little-endian ELF64 file (empty for anything else)."""
    f.seek(0)
    head = f.read(64)
    if len(head) < 64 or not head.startswith(_ELF64_LE):
        return []
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    f.seek(phoff)
    table = f.read(phentsize * phnum)
    out = []
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", table, i * phentsize)
        if p_type == PT_LOAD:
            out.append(Segment(p_vaddr, p_offset, p_filesz))
    return out


def read_code(f: BinaryIO, segments: Sequence[Segment], vaddr: int, n: int = 16) -> bytes:
    for seg in segments:
        if seg.vaddr <= vaddr < seg.vaddr + seg.filesz:
            f.seek(seg.offset + vaddr - seg.vaddr)
            return f.read(n)
    return b""


def wrapped_call(code: bytes, vaddr: int) -> int | None:
    """The callee of a `[endbr64;] sub $imm8,%rsp; call rel32` wrapper at `vaddr`."""
    at = 4 if code.startswith(b"\xf3\x0f\x1e\xfa") else 0
    if code[at:at + 3] != b"\x48\x83\xec" or len(code) < at + 9 or code[at + 4] != 0xE8:
        return None
    rel = int(struct.unpack_from("<i", code, at + 5)[0])
    return vaddr + at + 9 + rel


def starts_with_push(code: bytes) -> bool:
    """`push %reg` (emulated by the kernel's uprobes on x86-64): 50-57, or 41 50-57."""
    if code[:1] and 0x50 <= code[0] <= 0x57:
        return True
    return len(code) >= 2 and code[0] == 0x41 and 0x50 <= code[1] <= 0x57
