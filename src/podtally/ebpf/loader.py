"""The only module that imports bcc: compile probes.c, attach, poll, detach.

Uprobes are attached by file (an inode): every process that maps that libssl — now or
later — is traced. `Discovery` finds the files to attach to: the libssl files in each
container's library directories and what processes have mapped, through
`/proc/<pid>/root` so a container's own libssl is found; executables that link OpenSSL
statically (Node.js) are attached when they export the symbols. bcc attaches through
perf_event_open (no `uprobe_events` entries), so a killed agent leaves nothing behind: the
kernel drops the probes with the file descriptors. `close()` detaches explicitly on a clean exit.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from bcc import BPF  # Debian's python3-bpfcc (PyPI's "bcc" is another project)

from podtally.ebpf import prologue
from podtally.ebpf.events import KIND_NAMES

log = logging.getLogger("podtally.ebpf")

ENTRY_PROBES = (("SSL_write", "pt_write_enter"), ("SSL_write_ex", "pt_write_ex_enter"),
                ("SSL_read", "pt_read_enter"), ("SSL_read_ex", "pt_read_ex_enter"),
                ("SSL_free", "pt_free_enter"))
RETURN_PROBES = (("SSL_write", "pt_write_leave"), ("SSL_write_ex", "pt_write_leave"),
                 ("SSL_read", "pt_read_leave"), ("SSL_read_ex", "pt_read_leave"))
# The fast path (podtally.ebpf.prologue): the internal functions behind SSL_write_ex and
# SSL_read_ex, with the _ex argument layout.
INTERNAL = (("SSL_write_ex", "pt_write_ex_enter", "pt_write_leave"),
            ("SSL_read_ex", "pt_read_ex_enter", "pt_read_leave"))
PAGE_SIZE = 4096  # the ring buffer's size unit (bcc's BPF_RINGBUF_OUTPUT)
_LIBSSL = re.compile(r"/libssl\.so[.0-9]*$")


@dataclass(frozen=True)
class Target:
    """A file to attach to, as the agent can open it, and its identity (dev, inode)."""

    path: str
    key: tuple[int, int]


def target_for(path: str) -> Target | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return Target(path, (st.st_dev, st.st_ino))


def _mapped_files(pid: str, proc: Path = Path("/proc")) -> Iterator[str]:
    try:
        with open(f"{proc}/{pid}/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    yield parts[5].rstrip("\n")
    except OSError:
        return


# Where distributions keep libssl: looked at once per mount namespace (each container's
# filesystem), so a process that loads libssl late (Python imports ssl lazily) is covered.
LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu",
            "lib/aarch64-linux-gnu", "usr/lib64", "lib64", "usr/lib", "lib", "usr/local/lib",
            "usr/local/ssl/lib")


class Discovery:
    """Finds the files to attach to, cheaply enough to run every few seconds: each mount
    namespace's library directories once, and each process' mapped files once (a libssl,
    or, when it maps none, its executable: a candidate static OpenSSL build)."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc
        self._pids: set[str] = set()
        self._namespaces: set[str] = set()

    def scan(self) -> list[Target]:
        found: dict[tuple[int, int], Target] = {}
        pids = {e.name for e in self.proc.iterdir() if e.name.isdigit()}
        for pid in sorted(pids - self._pids):
            for path in self._new_paths(pid):
                t = target_for(path)
                if t is not None:
                    found.setdefault(t.key, t)
        self._pids = pids  # the dead are forgotten: pids are reused
        return list(found.values())

    def _new_paths(self, pid: str) -> Iterator[str]:
        root = f"{self.proc}/{pid}/root"
        try:
            ns = os.readlink(f"{self.proc}/{pid}/ns/mnt")
        except OSError:
            return
        if ns not in self._namespaces:
            self._namespaces.add(ns)
            for d in LIB_DIRS:
                try:
                    names = os.listdir(f"{root}/{d}")
                except OSError:
                    continue
                yield from (f"{root}/{d}/{n}" for n in names if _LIBSSL.search("/" + n))
        files = set(_mapped_files(pid, self.proc))
        libs = [f for f in files if _LIBSSL.search(f.removesuffix(" (deleted)"))]
        if not libs:
            try:
                exe = os.readlink(f"{self.proc}/{pid}/exe")
            except OSError:
                return
            libs = [exe] if exe in files else []
        yield from (f"{root}{lib}" for lib in libs)


def _symbol(path: str, name: str) -> int | None:
    try:
        found = BPF.get_user_functions_and_addresses(path.encode(), f"^{name}$".encode())
    except Exception:  # noqa: BLE001
        return None
    addrs = {int(addr) for _, addr in found}
    return addrs.pop() if len(addrs) == 1 else None


def internal_functions(path: str) -> dict[str, int] | None:
    """SSL_write_ex/SSL_read_ex → the address of the internal function each wraps, when
    both match the pattern podtally.ebpf.prologue expects; else None."""
    out = {}
    try:
        with open(path, "rb") as f:
            segments = prologue.load_segments(f)
            for name, _, _ in INTERNAL:
                addr = _symbol(path, name)
                if addr is None:
                    return None
                callee = prologue.wrapped_call(prologue.read_code(f, segments, addr), addr)
                if callee is None or not prologue.starts_with_push(
                        prologue.read_code(f, segments, callee)):
                    return None
                out[name] = callee
    except OSError:
        return None
    return out


def has_ssl_symbols(path: str) -> bool:
    """Whether a file exports OpenSSL's SSL_write (a libssl, or a static build)."""
    try:
        addr = BPF.get_user_addresses(path.encode(), b"SSL_write")
    except Exception:  # noqa: BLE001 - bcc raises plain Exception for "not found"
        return False
    return bool(addr)


class Probes:
    """probes.c loaded into the kernel; `poll()` hands each ring-buffer record to
    `on_record`. Not thread-safe: one thread polls and updates the maps."""

    def __init__(self, on_record: Callable[[bytes], None], *, ringbuf_pages: int = 1024,
                 proxy_uid: int = 1337, cgroup_scope: Path | None = None,
                 fast: bool = True) -> None:
        if ringbuf_pages <= 0 or ringbuf_pages & (ringbuf_pages - 1):
            raise ValueError(f"ring buffer pages must be a power of two, not {ringbuf_pages}")
        text = resources.files("podtally.ebpf").joinpath("probes.c").read_text()
        # A quarter of the ring queued wakes the agent (probes.c): three quarters are left
        # for what comes while it gets to it.
        cflags = [f"-DRINGBUF_PAGES={ringbuf_pages}", f"-DPROXY_UID={proxy_uid}",
                  f"-DWAKE_BYTES={ringbuf_pages * PAGE_SIZE // 4}",
                  f"-DCGROUP_FILTER={1 if cgroup_scope else 0}", "-Wno-macro-redefined"]
        self.bpf = BPF(text=text, cflags=cflags)
        self._closed = False
        self.attached: dict[tuple[int, int], str] = {}
        self.rejected: set[tuple[int, int]] = set()
        self.fast = fast
        self.fast_paths: dict[tuple[int, int], bool] = {}  # per file: internal functions?
        if cgroup_scope is not None:
            fd = os.open(cgroup_scope, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self.bpf["scope"][0] = fd
            finally:
                os.close(fd)

        self.records = 0

        def callback(_ctx: Any, data: Any, size: int) -> int:
            self.records += 1
            on_record(ctypes.string_at(data, size))
            return 0

        self._callback = callback  # bcc keeps only a weak reference
        self.bpf["events"].open_ring_buffer(callback)

    def attach(self, targets: Iterable[Target]) -> list[str]:
        """Attach to each new file that has the symbols; returns the paths attached."""
        done = []
        for t in targets:
            if t.key in self.attached or t.key in self.rejected:
                continue
            if not has_ssl_symbols(t.path):
                self.rejected.add(t.key)
                continue
            try:
                fast = internal_functions(t.path) if self.fast else None
                if fast is not None:
                    for name, enter, leave in INTERNAL:
                        path = t.path.encode()
                        self.bpf.attach_uprobe(name=path, addr=fast[name], fn_name=enter.encode())
                        self.bpf.attach_uretprobe(name=path, addr=fast[name],
                                                  fn_name=leave.encode())
                    self._try(self.bpf.attach_uprobe, t.path, "SSL_free", "pt_free_enter")
                else:
                    for sym, fn in ENTRY_PROBES:
                        self._try(self.bpf.attach_uprobe, t.path, sym, fn)
                    for sym, fn in RETURN_PROBES:
                        self._try(self.bpf.attach_uretprobe, t.path, sym, fn)
                self.fast_paths[t.key] = fast is not None
            except Exception as exc:  # noqa: BLE001 - a file we cannot probe is skipped
                log.warning("cannot attach to %s: %s", t.path, exc)
                self.rejected.add(t.key)
                continue
            self.attached[t.key] = t.path
            done.append(t.path)
        return done

    def _try(self, attach: Callable[..., Any], path: str, sym: str, fn: str) -> None:
        if sym != "SSL_write" and not BPF.get_user_addresses(path.encode(), sym.encode()):
            return  # SSL_*_ex are OpenSSL >= 1.1.1; SSL_write is required
        attach(name=path.encode(), sym=sym.encode(), fn_name=fn.encode())

    def drain(self) -> int:
        """Hand every record the kernel has queued to `on_record` (never waits); returns
        how many there were."""
        before = self.records
        self.bpf.ring_buffer_consume()
        return self.records - before

    def wait(self, seconds: float) -> int:
        """Sleep until the kernel asks for a drain (a quarter of the ring queued) or
        `seconds` pass, then drain; returns how many records there were. A signal ends
        the wait early."""
        before = self.records
        self.bpf.ring_buffer_poll(max(0, int(seconds * 1000)))  # epoll: drains if woken
        self.bpf.ring_buffer_consume()
        return self.records - before

    def lost(self) -> dict[str, int]:
        """Events dropped in the kernel so far (ring buffer or map full), by kind."""
        out: dict[str, int] = {}
        for key, per_cpu in self.bpf["lost"].items():
            n = int(sum(per_cpu))
            if n:
                out[KIND_NAMES.get(key.value, str(key.value))] = n
        return out

    def skip_cgroup(self, cgroup_id: int) -> None:
        """Stop copying plaintext of this cgroup (a pod whose sidecar meters it)."""
        table = self.bpf["skip_cgroups"]
        table[table.Key(cgroup_id)] = table.Leaf(1)

    def ignore_connection(self, pid: int, conn: int) -> None:
        """Stop copying this TLS connection's plaintext (it carries no LLM calls)."""
        table = self.bpf["ignored_conns"]
        key = table.Key()
        key.ssl, key.pid = conn, pid
        table[key] = table.Leaf(1)

    def close(self) -> None:
        """Detach every probe and free the programs and maps."""
        if not self._closed:
            self._closed = True
            self.bpf.cleanup()
