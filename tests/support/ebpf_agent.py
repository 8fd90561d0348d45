"""Runs `podtally ebpf-agent` as a real process (root), and cgroups that play pods.

The agent compiles and attaches real probes; tests hand it `--cgroup` = a cgroup v2
directory of their own (`TestCgroup`), so only processes the test put there are traced and
every number is exact even while other tests run on the machine. A process is put into a
cgroup before it execs (`preexec_fn`), so its first SSL call is already inside.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from support.sidecar import MeteringProcess, Sample, free_port

PREFIX = "podtally-test-"
_NAME = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]{{6}}$")


def cgroup2_root() -> Path:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or …/unified in hybrid)."""
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return Path(parts[1])
    raise RuntimeError("no cgroup2 hierarchy mounted")


def libssl_of_python() -> str:
    """The libssl this interpreter's _ssl module maps (what the apps under test use)."""
    import ssl  # noqa: F401 - maps libssl into this process

    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and re.search(r"/libssl\.so[.0-9]*$", parts[5]):
            return parts[5]
    raise RuntimeError("this Python maps no libssl")


def _kill_all(cg: Path) -> None:
    for _ in range(100):
        try:
            pids = [int(p) for p in (cg / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _remove_tree(root: Path) -> None:
    dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for d in [*dirs, root]:
        _kill_all(d)
        with contextlib.suppress(FileNotFoundError, OSError):
            d.rmdir()


class TestCgroup:
    """A cgroup v2 subtree of the test's own; everything in it is killed on cleanup."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        base = cgroup2_root()
        for stale in base.glob(f"{PREFIX}*"):
            m = _NAME.match(stale.name)
            if m and not Path(f"/proc/{m.group(1)}").exists():
                _remove_tree(stale)
        self.root = base / f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.root.mkdir()

    def child(self, relpath: str) -> Path:
        path = self.root / relpath
        path.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def joiner(path: Path) -> Callable[[], None]:
        """A preexec_fn that moves the new process into `path`."""
        procs = str(path / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        return join

    @staticmethod
    def move(pid: int, path: Path) -> None:
        (path / "cgroup.procs").write_text(str(pid))

    def cleanup(self) -> None:
        _remove_tree(self.root)


class AgentProcess(MeteringProcess):
    """`podtally ebpf-agent` as root; stdout = usage records, scraped on 127.0.0.1."""

    what = "agent"

    def __init__(self, *args: str, cgroup: Path | None, libssl: Sequence[str] = (),
                 discover: bool = False, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "podtally.cli", "ebpf-agent",
                "--metrics-host", "127.0.0.1", "--metrics-port", str(self.port),
                "--discover" if discover else "--no-discover", *args]
        if cgroup is not None:
            argv += ["--cgroup", str(cgroup)]
        for lib in libssl:
            argv += ["--libssl", lib]
        super().__init__(argv, env={**os.environ, **(env or {})},
                         metrics_url=f"http://127.0.0.1:{self.port}/metrics")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        super().wait_ready(timeout)

    def wait_records(self, n: int, timeout: float = 15) -> list[dict[str, Any]]:
        return super().wait_records(n, timeout)

    def wait_metric(self, cond: Callable[[dict[Sample, float]], bool],
                    timeout: float = 15) -> dict[Sample, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if cond(m) or time.monotonic() > deadline:
                return m
            time.sleep(0.1)


@contextlib.contextmanager
def running_agent(*args: str, cgroup: Path | None, **kwargs: Any) -> Iterator[AgentProcess]:
    agent = AgentProcess(*args, cgroup=cgroup, **kwargs)
    try:
        agent.wait_ready()
        yield agent
    except BaseException:
        with contextlib.suppress(AssertionError):
            agent.terminate(timeout=10)
        print(f"--- agent stderr ---\n{agent.stderr}")
        raise
    rc = agent.terminate()
    assert rc == 0, f"agent exited {rc}:\n{agent.stderr}"


# -- an app: the official openai SDK, straight to a provider (no proxy) ---------------------

DATA = Path(__file__).resolve().parents[1] / "providers" / "testdata"

OPENAI_APP = r'''
import json, sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-test-SECRET", max_retries=0)
out = {}
for case in sys.argv[2:]:
    if case == "chat":
        r = client.chat.completions.create(model="gpt-4o", extra_query={"case": "chat"},
            messages=[{"role": "user", "content": "hello"}])
        out[case] = {"model": r.model, "usage": r.usage.total_tokens}
    elif case == "stream":
        s = client.chat.completions.create(model="gpt-4o-mini", extra_query={"case": "stream"},
            stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "hello"}])
        text, usage = "", None
        for chunk in s:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage.total_tokens
        out[case] = {"text": text, "usage": usage}
    elif case == "stream-no-usage":
        s = client.chat.completions.create(model="gpt-4o-mini", extra_query={"case": "nousage"},
            stream=True, messages=[{"role": "user", "content": "hello"}])
        out[case] = {"chunks": sum(1 for _ in s)}
print(json.dumps(out))
'''


def expected(stem: str) -> dict[str, Any]:
    import json

    return dict(json.loads((DATA / f"{stem}.expected.json").read_text()))


def run_openai_app(cgroup_dir: Path, base_url: str, ca: Path, *cases: str) -> dict[str, Any]:
    """The SDK app as a process in `cgroup_dir`; returns what it printed."""
    import json

    res = subprocess.run(
        [sys.executable, "-c", OPENAI_APP, base_url, *cases], capture_output=True, text=True,
        env={"SSL_CERT_FILE": str(ca), "PATH": "/usr/bin:/bin", "NO_PROXY": "*"},
        preexec_fn=TestCgroup.joiner(cgroup_dir), timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))
