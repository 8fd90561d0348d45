"""Real network namespaces that play a Kubernetes pod and the LLM provider it calls.

Needs root, ``ip`` (Debian package iproute2), ``setpriv`` (util-linux) and, for capture rules,
``iptables``.  Nothing here touches the root network namespace: the veth pair is created inside
the pod namespace with its peer moved straight into the provider namespace, so both ends are
called ``eth0`` and parallel runs cannot clash on addresses or interface names::

    pod netns  (pt-pod-<pid>-<hex>)            provider netns  (pt-prov-<pid>-<hex>)
      lo       127.0.0.1                          lo
      eth0     198.18.0.1/30  2001:2::1/64  <-->  eth0  198.18.0.2/30  2001:2::2/64
      default via 198.18.0.2 / 2001:2::2                + extra /32s from 198.19.0.0/16

198.18.0.0/15 and 2001:2::/48 are the benchmarking ranges (RFC 2544 / RFC 5180).  The pod gets
``/etc/netns/<pod>/hosts`` (``ip netns exec`` bind-mounts it over ``/etc/hosts``) mapping
provider host names to provider addresses, and a ``resolv.conf`` without name servers, so
nothing resolves outside the test.

Typical use::

    with pod_with_provider(hosts=["api.openai.com"]) as pod:
        server = pod.provider.popen([python, "-c", SERVER])        # root, provider netns
        app = pod.popen([python, "client.py"], uid=1000)           # uid 1000, pod netns
        apply(cfg, runner=pod.subprocess_run)                      # iptables in the pod netns

Every process started through :meth:`Netns.popen` is killed on exit (and, via
``setpriv --pdeathsig KILL``, if the test process dies); any other process still inside a
namespace is killed before the namespace, its veth, ``/etc/netns/<name>`` and the work
directory ``/var/tmp/<name>`` are removed.  Names embed the creating pid, so
:func:`cleanup_stale` (run on every entry) removes only leftovers of dead test processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "DEFAULT_HOSTS",
    "Netns",
    "Pod",
    "Provider",
    "UidPython",
    "cleanup_stale",
    "netns",
    "pod_with_provider",
    "python_for_uid",
    "require_tools",
]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_HOSTS = ("api.openai.com", "api.anthropic.com")

POD_IFACE = PROVIDER_IFACE = "eth0"
POD_ADDR, PROVIDER_ADDR, V4_PREFIX = "198.18.0.1", "198.18.0.2", 30
POD_ADDR6, PROVIDER_ADDR6, V6_PREFIX = "2001:2::1", "2001:2::2", 64
EXTRA_ADDRESSES = ipaddress.ip_network("198.19.0.0/16")

_NAME_RE = re.compile(r"^pt-(?:pod|prov|ns)-(?P<pid>\d+)-[0-9a-f]{6}$")
_NETNS_RUN = Path("/run/netns")
_NETNS_ETC = Path("/etc/netns")
_WORK_ROOT = Path("/var/tmp")
_SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PACKAGES = {"ip": "iproute2", "setpriv": "util-linux", "iptables-restore": "iptables"}


# --------------------------------------------------------------------------------- tools


def _tool(name: str) -> str:
    found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:{_SYS_PATH}")
    if found is None:
        pkg = _PACKAGES.get(name, name)
        raise RuntimeError(f"{name} not found: apt-get install {pkg}")
    return found


def require_tools(*names: str) -> None:
    """Fail clearly (naming the Debian package) unless root and every tool is present."""
    if os.geteuid() != 0:
        raise RuntimeError("network namespace tests need root")
    for name in names or ("ip", "setpriv", "iptables-restore"):
        _tool(name)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([_tool("ip"), *args], capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {res.stderr.strip()}")
    return res


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------- netns


@dataclass(eq=False)
class Netns:
    """A named network namespace (``/run/netns/<name>``) with a scratch work directory."""

    name: str
    workdir: Path
    procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def exec_argv(
        self, argv: Sequence[str], *, uid: int | None = None, gid: int | None = None
    ) -> list[str]:
        """``argv`` prefixed to run in this netns (as ``uid``/``gid``, groups cleared).

        The parent-death signal is set by a second ``setpriv`` *after* the uid switch: the
        kernel clears it on any credential change.
        """
        setpriv = _tool("setpriv")
        prefix = [_tool("ip"), "netns", "exec", self.name]
        if uid is not None:
            gid = uid if gid is None else gid
            prefix += [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
        return [*prefix, setpriv, "--pdeathsig=KILL", "--", *argv]

    def home(self, uid: int, gid: int | None = None) -> Path:
        """A private, writable home directory for ``uid`` inside the work directory."""
        path = self.workdir / f"home-{uid}"
        if not path.exists():
            path.mkdir(mode=0o700)
            os.chown(path, uid, uid if gid is None else gid)
        return path

    def env(self, uid: int | None = None, gid: int | None = None) -> dict[str, str]:
        """The clean base environment processes get (PATH, HOME, LANG, unbuffered Python)."""
        home = str(self.home(uid, gid)) if uid not in (None, 0) else "/root"
        return {
            "PATH": _SYS_PATH,
            "HOME": home,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        }

    def popen(
        self,
        argv: Sequence[str],
        *,
        uid: int | None = None,
        gid: int | None = None,
        env: Mapping[str, str] | None = None,
        inherit_env: bool = False,
        **kwargs: Any,
    ) -> subprocess.Popen[str]:
        """Start ``argv`` in this netns as ``uid``/``gid`` (default root); killed on cleanup.

        The environment is :meth:`env` (or ``os.environ`` with ``inherit_env``) updated with
        ``env``.  Defaults: ``stdin=DEVNULL``, ``stdout=stderr=PIPE``, ``text=True``, cwd the
        work directory, own session.  Pass files as stdout/stderr for chatty processes: an
        unread pipe blocks the writer once full.  ``setpriv --pdeathsig=KILL`` kills the
        process when the *thread* that started it exits: start long-lived processes from the
        test's main thread, not from a short-lived worker thread.
        """
        full_env = dict(os.environ) if inherit_env else self.env(uid, gid)
        full_env.update(env or {})
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        kwargs.setdefault("cwd", self.workdir)
        kwargs["start_new_session"] = True
        proc: subprocess.Popen[str] = subprocess.Popen(
            self.exec_argv(argv, uid=uid, gid=gid), env=full_env, **kwargs
        )
        self.procs.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        uid: int | None = None,
        gid: int | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 30,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion in this netns; output captured; raises on failure."""
        proc = self.popen(argv, uid=uid, gid=gid, env=env, stdin=subprocess.PIPE)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            raise RuntimeError(
                f"timed out after {timeout}s in {self.name}: {list(argv)}\n{out}\n{err}"
            ) from None
        res = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
        if check and res.returncode != 0:
            raise RuntimeError(
                f"exit {res.returncode} in {self.name}: {list(argv)}\n"
                f"stdout: {out.strip()}\nstderr: {err.strip()}"
            )
        return res

    def subprocess_run(
        self, args: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Drop-in for :func:`subprocess.run` running ``args`` (as root) inside this netns.

        Meant as the ``runner`` of ``podtally.iptables.apply``.
        """
        if "env" not in kwargs:
            kwargs["env"] = {**os.environ, "PATH": f"{os.environ.get('PATH', '')}:{_SYS_PATH}"}
        return subprocess.run(self.exec_argv(args), **kwargs)

    def pids(self) -> list[int]:
        """Pids of every process currently in this network namespace."""
        res = _ip("netns", "pids", self.name, check=False)
        return [int(p) for p in res.stdout.split()]

    def cleanup(self) -> None:
        """Kill everything in the namespace, then delete it and its files (best effort)."""
        _destroy(self.name, self.procs)


_N = TypeVar("_N", bound=Netns)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


def _destroy(name: str, procs: Iterable[subprocess.Popen[Any]] = ()) -> None:
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
        _kill_group(proc)
    if (_NETNS_RUN / name).exists():
        for _ in range(50):
            pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        else:
            warnings.warn(f"processes left in netns {name}: {pids}", stacklevel=2)
        for link in ("eth0",):
            _ip("-n", name, "link", "del", link, check=False)
        res = _ip("netns", "del", name, check=False)
        if res.returncode != 0 and (_NETNS_RUN / name).exists():
            warnings.warn(f"could not delete netns {name}: {res.stderr.strip()}", stacklevel=2)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
    shutil.rmtree(_NETNS_ETC / name, ignore_errors=True)
    shutil.rmtree(_WORK_ROOT / name, ignore_errors=True)


def cleanup_stale() -> list[str]:
    """Remove namespaces/files named ``pt-{pod,prov,ns}-<pid>-<hex>`` whose pid is dead.

    Live runs (their creating pid exists) and anything not matching the pattern are left
    alone.  Returns the names removed.
    """
    names: set[str] = set()
    for root in (_NETNS_RUN, _NETNS_ETC, _WORK_ROOT):
        with contextlib.suppress(FileNotFoundError):
            names.update(p.name for p in root.iterdir())
    stale = []
    for name in sorted(names):
        m = _NAME_RE.match(name)
        if m and not _pid_alive(int(m["pid"])):
            _destroy(name)
            stale.append(name)
    return stale


def _new_name(kind: str) -> str:
    return f"pt-{kind}-{os.getpid()}-{secrets.token_hex(3)}"


def _create(kind: str, cls: type[_N], **fields: Any) -> _N:
    name = _new_name(kind)
    workdir = _WORK_ROOT / name
    workdir.mkdir(mode=0o755)
    workdir.chmod(0o755)  # umask-proof: other uids must traverse it
    ns = cls(name=name, workdir=workdir, **fields)
    try:
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")
    except BaseException:
        ns.cleanup()
        raise
    return ns


@contextlib.contextmanager
def netns(kind: str = "ns") -> Iterator[Netns]:
    """A fresh namespace (loopback up) named ``pt-<kind>-<pid>-<hex>``; destroyed on exit."""
    if kind not in ("pod", "prov", "ns"):
        raise ValueError(f"kind must be pod, prov or ns, not {kind!r}")
    require_tools("ip", "setpriv")
    cleanup_stale()
    ns = _create(kind, Netns)
    try:
        yield ns
    finally:
        ns.cleanup()


# ---------------------------------------------------------------------- pod + provider


@dataclass(eq=False)
class Provider(Netns):
    """The provider side: answers on ``address`` plus any :meth:`add_address` extras."""

    address: str = PROVIDER_ADDR
    address6: str | None = None
    addresses: list[str] = field(default_factory=list)

    def add_address(self, address: str | None = None) -> str:
        """Add another local address (a /32 or /128; next free 198.19.x.y when omitted).

        The pod's default route points here, so the pod reaches it with no extra routes.
        """
        if address is None:
            taken = set(self.addresses)
            address = next(str(a) for a in EXTRA_ADDRESSES.hosts() if str(a) not in taken)
        ip = ipaddress.ip_address(address)
        nodad = " nodad" if ip.version == 6 else ""
        _ip(*f"-n {self.name} addr add {ip}/{ip.max_prefixlen} dev eth0{nodad}".split())
        self.addresses.append(str(ip))
        return str(ip)


@dataclass(eq=False, kw_only=True)
class Pod(Netns):
    """The pod side; ``provider`` is reachable through the default route."""

    provider: Provider
    address: str = POD_ADDR
    address6: str | None = None
    hosts: dict[str, str] = field(default_factory=dict)

    def set_hosts(self, hosts: Mapping[str, str]) -> None:
        """Replace the host name -> address map seen by processes started afterwards."""
        self.hosts = {name: str(ipaddress.ip_address(addr)) for name, addr in hosts.items()}
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        lines += [f"{addr}\t{name}" for name, addr in self.hosts.items()]
        etc = _NETNS_ETC / self.name
        etc.mkdir(mode=0o755, parents=True, exist_ok=True)
        _write(etc / "hosts", "\n".join(lines) + "\n")
        _write(
            etc / "resolv.conf",
            "# podtally test pod: no name servers on purpose\noptions timeout:1 attempts:1\n",
        )


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    tmp.replace(path)


@contextlib.contextmanager
def pod_with_provider(
    hosts: Mapping[str, str] | Iterable[str] = DEFAULT_HOSTS, *, ipv6: bool = True
) -> Iterator[Pod]:
    """A pod netns wired to a provider netns (see the module docstring for the layout).

    ``hosts`` maps names to addresses for the pod's ``/etc/hosts``; plain names map to the
    provider's primary address (change it later with :meth:`Pod.set_hosts`).  With ``ipv6``
    both ends also get 2001:2::1/64 and 2001:2::2/64 (no DAD) and a default IPv6 route.
    Both namespaces and everything in them are destroyed on exit.
    """
    require_tools("ip", "setpriv")
    cleanup_stale()
    with contextlib.ExitStack() as stack:
        provider = _create("prov", Provider)
        stack.callback(provider.cleanup)
        pod = _create("pod", Pod, provider=provider)
        stack.callback(pod.cleanup)

        pod_n, prov_n = pod.name, provider.name
        _ip(
            *f"-n {pod_n} link add {POD_IFACE} type veth peer name {PROVIDER_IFACE}".split(),
            "netns",
            prov_n,
        )
        _ip(*f"-n {pod_n} addr add {POD_ADDR}/{V4_PREFIX} dev {POD_IFACE}".split())
        _ip(*f"-n {prov_n} addr add {PROVIDER_ADDR}/{V4_PREFIX} dev {PROVIDER_IFACE}".split())
        provider.addresses.append(PROVIDER_ADDR)
        if ipv6:
            for ns, addr in ((pod, POD_ADDR6), (provider, PROVIDER_ADDR6)):
                _ip("-n", ns.name, "addr", "add", f"{addr}/{V6_PREFIX}", "dev", "eth0", "nodad")
            pod.address6, provider.address6 = POD_ADDR6, PROVIDER_ADDR6
            provider.addresses.append(PROVIDER_ADDR6)
        for ns in (pod, provider):
            _ip("-n", ns.name, "link", "set", "eth0", "up")
        _ip("-n", pod.name, "route", "add", "default", "via", PROVIDER_ADDR)
        if ipv6:
            _ip("-n", pod.name, "-6", "route", "add", "default", "via", PROVIDER_ADDR6)

        mapping = dict(hosts) if isinstance(hosts, Mapping) else dict.fromkeys(hosts, PROVIDER_ADDR)
        pod.set_hosts(mapping)
        yield pod


# ------------------------------------------------------------------ python for other uids


@dataclass(frozen=True)
class UidPython:
    """A Python interpreter that ``uid`` can run and import podtally with.

    Run it as ``[executable, ...]`` with ``env`` merged into the process environment.  Use
    ``python -m <module>`` rather than the venv's ``bin/`` scripts: in a copied venv those
    still point at the original interpreter path.
    """

    executable: str
    env: dict[str, str]
    origin: str
    """``repo-venv``, ``repo-venv+src`` (PYTHONPATH=src) or ``copy:<dir>``."""


_PROBE = "import podtally, sys; print(sys.executable, podtally.__path__[0])"


def _probe(python: str, uid: int, gid: int, env: Mapping[str, str]) -> tuple[bool, str]:
    argv = [
        _tool("setpriv"),
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--",
        python,
        "-c",
        _PROBE,
    ]
    full_env = {"PATH": _SYS_PATH, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", **env}
    try:
        res = subprocess.run(
            argv, capture_output=True, text=True, env=full_env, cwd="/", timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return res.returncode == 0, (res.stdout + res.stderr).strip()


@cache
def python_for_uid(uid: int = 1337, gid: int | None = None, *, repo: Path = REPO) -> UidPython:
    """Find (or build) a Python that ``uid`` can execute and import podtally from.

    Tries, as ``uid`` via setpriv: the repo's ``.venv/bin/python``; the same with
    ``PYTHONPATH=<repo>/src`` (podtally not installed in the venv).  If the checkout is not
    traversable by ``uid`` (e.g. under ``/root``, mode 700), copies the venv's site-packages
    and ``src/podtally`` into ``/var/tmp/podtally-venv-<hash>`` (world-readable, rebuilt when
    the venv's packages change, podtally re-synced on every call, guarded by a file lock).
    Raises ``RuntimeError`` with every attempt's output if nothing works; never skips.
    """
    gid = uid if gid is None else gid
    venv_python = str(repo / ".venv" / "bin" / "python")
    attempts: list[str] = []
    candidates: list[tuple[str, dict[str, str], str]] = [
        (venv_python, {}, "repo-venv"),
        (venv_python, {"PYTHONPATH": str(repo / "src")}, "repo-venv+src"),
    ]
    for python, env, origin in candidates:
        ok, out = _probe(python, uid, gid, env)
        if ok:
            return UidPython(python, env, origin)
        attempts.append(f"{origin} ({python}, {env}): {out}")
    try:
        copy = _copy_venv(repo)
        ok, out = _probe(str(copy / "bin" / "python"), uid, gid, {})
        if ok:
            return UidPython(str(copy / "bin" / "python"), {}, f"copy:{copy}")
        attempts.append(f"copy ({copy}): {out}")
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        attempts.append(f"copy: {exc}")
    raise RuntimeError(f"no Python usable by uid {uid}:\n  " + "\n  ".join(attempts))


def _venv_paths(python: str) -> tuple[str, list[Path]]:
    code = (
        "import sys, sysconfig; p = sysconfig.get_paths(); "
        "print(sys._base_executable); print(p['purelib']); print(p['platlib'])"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    base, *libs = out.stdout.split("\n")[:3]
    return base, sorted({Path(lib) for lib in libs})


def _copy_venv(repo: Path) -> Path:
    src_python = str(repo / ".venv" / "bin" / "python")
    base, src_libs = _venv_paths(src_python)
    digest = hashlib.sha256(str(repo.resolve()).encode()).hexdigest()[:12]
    dest = _WORK_ROOT / f"podtally-venv-{digest}"
    fingerprint = "\n".join(
        f"{entry.name} {entry.stat().st_mtime_ns}"
        for lib in src_libs
        for entry in sorted(lib.iterdir())
        if not entry.name.startswith("__editable__")
    )
    skip = shutil.ignore_patterns(
        "__pycache__", "__editable__*", "*.egg-link", "podtally*.pth", "_podtally*"
    )
    no_pycache = shutil.ignore_patterns("__pycache__")
    with open(_WORK_ROOT / f"podtally-venv-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = dest / ".podtally-fingerprint"
        if not (stamp.exists() and stamp.read_text() == fingerprint):
            tmp = Path(tempfile.mkdtemp(prefix=f"{dest.name}.", dir=_WORK_ROOT))
            subprocess.run(
                [base, "-m", "venv", "--without-pip", str(tmp)], check=True, capture_output=True
            )
            _, dst_libs = _venv_paths(str(tmp / "bin" / "python"))
            for src_lib, dst_lib in zip(src_libs, dst_libs, strict=True):
                shutil.copytree(src_lib, dst_lib, ignore=skip, dirs_exist_ok=True, symlinks=True)
            (tmp / ".podtally-fingerprint").write_text(fingerprint)
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
        _, dst_libs = _venv_paths(str(dest / "bin" / "python"))
        pkg = dst_libs[0] / "podtally"
        shutil.rmtree(pkg, ignore_errors=True)
        shutil.copytree(repo / "src" / "podtally", pkg, ignore=no_pycache)
        subprocess.run(["chmod", "-R", "a+rX", str(dest)], check=True)
    return dest
