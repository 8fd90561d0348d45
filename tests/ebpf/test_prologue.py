"""Where the cheap probes go: the wrappers' machine code, read. Pure, plus this machine's
own libssl (the tests' apps use it)."""

from __future__ import annotations

import io
import struct

from support.ebpf_agent import libssl_of_python

from podtally.ebpf import prologue


def test_wrapper_patterns() -> None:
    # sub $0x8,%rsp; call +0x10 (from the end of the call at 0x1009)
    code = bytes.fromhex("4883ec08") + b"\xe8" + struct.pack("<i", 0x10) + b"\x31\xd2"
    assert prologue.wrapped_call(code, 0x1000) == 0x1000 + 9 + 0x10
    with_endbr = bytes.fromhex("f30f1efa") + code
    assert prologue.wrapped_call(with_endbr, 0x1000) == 0x1000 + 13 + 0x10
    backwards = bytes.fromhex("4883ec08") + b"\xe8" + struct.pack("<i", -0x500)
    assert prologue.wrapped_call(backwards, 0x2000) == 0x2000 + 9 - 0x500
    assert prologue.wrapped_call(bytes.fromhex("4883ec18") + b"\x64\x48", 0) is None  # SSL_write
    assert prologue.wrapped_call(b"\x53\x48", 0) is None
    assert prologue.starts_with_push(b"\x41\x56") and prologue.starts_with_push(b"\x55")
    assert not prologue.starts_with_push(b"\x48\x83\xec\x08")


def test_elf_segments_map_addresses_to_file_offsets() -> None:
    # A minimal ELF64 header with one PT_LOAD at vaddr 0x400000, file offset 0x1000.
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", head, 32, 64)  # e_phoff
    struct.pack_into("<HH", head, 54, 56, 1)  # e_phentsize, e_phnum
    ph = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, 0x400000, 0x400000, 0x100, 0x100, 0x1000)
    data = bytes(head) + ph + bytes(0x1000 - 64 - 56) + b"\x41\x56" + bytes(14)
    f = io.BytesIO(data)
    segments = prologue.load_segments(f)
    assert segments == [prologue.Segment(0x400000, 0x1000, 0x100)]
    assert prologue.read_code(f, segments, 0x400000, 2) == b"\x41\x56"
    assert prologue.read_code(f, segments, 0x500000) == b""
    assert prologue.load_segments(io.BytesIO(b"MZ" + bytes(100))) == []


def test_this_machines_libssl_takes_the_fast_path() -> None:
    """Debian 12's OpenSSL 3: both wrappers match, and their callees begin with push."""
    from podtally.ebpf.loader import internal_functions

    found = internal_functions(libssl_of_python())
    assert found is not None and set(found) == {"SSL_write_ex", "SSL_read_ex"}
    assert found["SSL_write_ex"] != found["SSL_read_ex"]
