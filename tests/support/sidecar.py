"""Runs `podtally sidecar` as a real process and reads what it exposes: records, metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, frozenset[tuple[str, str]]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_metrics(text: str) -> dict[Sample, float]:
    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def select(metrics: dict[Sample, float], name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """Samples of one metric whose labels include `labels`."""
    want = set(labels.items())
    return {lbl: v for (n, lbl), v in metrics.items() if n == name and want <= lbl}


def total(metrics: dict[Sample, float], name: str, **labels: str) -> float:
    return sum(select(metrics, name, **labels).values())


class MeteringProcess:
    """A podtally process under test (the sidecar, the eBPF agent): one JSON usage record per
    line on stdout, stderr kept, /metrics and /readyz beside `metrics_url`."""

    what = "process"  # for error messages

    def __init__(self, argv: Sequence[str], *, env: dict[str, str], metrics_url: str) -> None:
        self.metrics_url = metrics_url
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            text=True, start_new_session=True,
        )
        self.records: list[dict[str, Any]] = []
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True).start()

    def _read(self, stream: Any, is_stdout: bool) -> None:
        for line in stream:
            with self._cond:
                if is_stdout:
                    self.stdout_lines.append(line)
                    self.records.append(json.loads(line))
                else:
                    self.stderr_lines.append(line)
                self._cond.notify_all()

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.what} exited {self.proc.returncode}:\n{self.stderr}")
            try:
                if httpx.get(self.metrics_url.replace("/metrics", "/readyz"), timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.what} not ready after {timeout}s:\n{self.stderr}")

    def wait_records(self, n: int, timeout: float = 10) -> list[dict[str, Any]]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.records) >= n, timeout)
            if not ok:
                raise TimeoutError(f"{len(self.records)} records, wanted {n}:\n{self.stderr}")
            return list(self.records)

    def scrape(self) -> str:
        return httpx.get(self.metrics_url, timeout=5).text

    def metrics(self) -> dict[Sample, float]:
        """Current values, staged calls included (a first scrape releases them)."""
        self.scrape()
        return parse_metrics(self.scrape())

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait; past `timeout` the process is killed and that is an error."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.what} still running {timeout}s after SIGTERM:\n"
                                 f"{self.stderr}") from None


class SidecarProcess(MeteringProcess):
    what = "sidecar"

    def __init__(self, argv: Sequence[str], *, env: dict[str, str], metrics_url: str) -> None:
        super().__init__(argv, env=env, metrics_url=metrics_url)
        self.proxy_port = 0


def sidecar_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "podtally.cli", "sidecar", *args]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POD_", "PODTALLY_"))}
    env.update(extra)
    return env


def lines_of(path: Path) -> Iterator[str]:
    yield from path.read_text().splitlines()
