"""A real Prometheus (Debian's) over a TSDB built from OpenMetrics text with promtool.

`promtool tsdb create-blocks-from openmetrics` turns samples at known timestamps into
blocks; Prometheus then serves them read-only (no scrape jobs, 100 years' retention, so
old blocks are kept), on a free loopback port.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx
from support.sidecar import free_port

# One series: (metric name, labels) -> [(unix seconds, value), ...] oldest first.
SeriesData = Mapping[tuple[str, tuple[tuple[str, str], ...]], Sequence[tuple[float, float]]]


def have_prometheus() -> bool:
    return bool(shutil.which("prometheus") and shutil.which("promtool"))


def openmetrics(series: SeriesData) -> str:
    """Counter families in OpenMetrics text, each family's samples together, `# EOF` last."""
    families: dict[str, list[str]] = {}
    for (name, labels), samples in series.items():
        family = name.removesuffix("_total")
        lines = families.setdefault(family, [f"# TYPE {family} counter"])
        rendered = ",".join(f'{k}="{v}"' for k, v in labels)
        lines += [f"{name}{{{rendered}}} {value!r} {ts!r}" for ts, value in samples]
    return "\n".join(line for lines in families.values() for line in lines) + "\n# EOF\n"


class RunningPrometheus:
    def __init__(self, series: SeriesData, workdir: Path, *, promtool_timeout: float = 60.0
                 ) -> None:
        self.series = series
        self.promtool_timeout = promtool_timeout
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RunningPrometheus:
        data = self.workdir / "tsdb"
        source = self.workdir / "samples.om"
        source.write_text(openmetrics(self.series))
        # One block per month, not per 2 h: a month of samples takes seconds, not minutes.
        subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", "-q",
                        "--max-block-duration=800h", str(source), str(data)], check=True, capture_output=True,
                       timeout=self.promtool_timeout)
        config = self.workdir / "prometheus.yml"
        config.write_text("global: {}\n")
        log = (self.workdir / "prometheus.log").open("wb")
        self._proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={data}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=100y"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError("prometheus exited: "
                                   + (self.workdir / "prometheus.log").read_text()[-2000:])
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready at {self.url} within {timeout}s")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
