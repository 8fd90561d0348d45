"""The kernel's events (probes.c) as Python values. Pure: bytes in, values out.

Decoded once per ring-buffer record, so kept cheap: events are named tuples (a frozen
dataclass costs three times as much to build) and a task's `Task` is built once and reused
(bounded cache; a Task is immutable).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import NamedTuple

WRITE, READ, CLOSE, CONNECT, TRUNC, ARGS = 1, 2, 3, 4, 5, 6
KIND_NAMES = {WRITE: "write", READ: "read", CLOSE: "close", CONNECT: "connect",
              TRUNC: "truncated", ARGS: "call_args"}

MAX_CHUNK = 16384
MAX_PIECES = 8
_DATA_KINDS = frozenset({WRITE, READ, CLOSE, TRUNC})
RINGBUF_RECORD_HEADER = 8  # the kernel's per-record header in a BPF ring buffer

# struct data_event, up to `data` (probes.c); little-endian x86-64/arm64 layout.
_DATA = struct.Struct("<B3xIIIQQQIII16s")
DATA_HEADER_SIZE = _DATA.size  # offsetof(struct data_event, data)
# struct connect_event.
_CONNECT = struct.Struct("<BBHIIIQQQ16s16s")
CONNECT_SIZE = _CONNECT.size


def ringbuf_record_size(payload: int) -> int:
    """Bytes one record takes in the ring buffer: header plus payload, 8-aligned."""
    return (RINGBUF_RECORD_HEADER + payload + 7) & ~7


@dataclass(frozen=True, slots=True)
class Task:
    """Who did it: the process (pid = tgid), its uid, cgroup v2 id and command name."""

    pid: int
    uid: int
    cgroup: int
    comm: str


class DataEvent(NamedTuple):
    """Plaintext one SSL_write/SSL_read call moved (or a piece of it), or SSL_free."""

    kind: int
    task: Task
    conn: int  # the SSL* pointer
    ts: int  # CLOCK_MONOTONIC ns
    offset: int
    total: int
    data: bytes


class ConnectEvent(NamedTuple):
    task: Task
    ts: int
    address: str
    port: int


def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


_TASKS: dict[tuple[int, int, int, bytes], Task] = {}
_MAX_TASKS = 4096


def _task(pid: int, uid: int, cgroup: int, comm: bytes) -> Task:
    key = (pid, uid, cgroup, comm)
    task = _TASKS.get(key)
    if task is None:
        if len(_TASKS) >= _MAX_TASKS:
            _TASKS.clear()
        task = _TASKS[key] = Task(pid, uid, cgroup, _comm(comm))
    return task


def decode(raw: bytes) -> DataEvent | ConnectEvent | None:
    """One ring-buffer record; None for a record this version does not know."""
    if not raw:
        return None
    kind = raw[0]
    if kind in _DATA_KINDS and len(raw) >= DATA_HEADER_SIZE:
        kind, pid, _tid, uid, conn, ts, cgroup, length, total, offset, comm = (
            _DATA.unpack_from(raw))
        return DataEvent(kind, _task(pid, uid, cgroup, comm), conn, ts, offset, total,
                         raw[DATA_HEADER_SIZE:DATA_HEADER_SIZE + length])
    if kind == CONNECT:
        if len(raw) < CONNECT_SIZE:
            return None
        _, family, dport, pid, _tid, uid, _cookie, ts, cgroup, daddr, comm = (
            _CONNECT.unpack_from(raw))
        addr = ipaddress.ip_address(daddr[:4] if family == 4 else daddr)
        return ConnectEvent(_task(pid, uid, cgroup, comm), ts, str(addr), dport)
    return None
