"""The Prometheus HTTP API client: the report's only I/O.

Raw samples come from instant queries of range selectors (`metric[Nms]` evaluated at t),
which return every stored sample of every series in the range, untouched. Ranges are cut
so that each answer holds about `max_samples_per_query` samples (planned from one
`count_over_time` query; 500k samples are some 15 MB of JSON, far under Prometheus' default
--query.max-samples of 50M), and each answer is filtered to its own [a, b) by timestamp:
Prometheus 2 includes both ends of a range and Prometheus 3 only the right one, so the
filter makes the result the same on both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx

from podtally.report.build import SeriesSamples
from podtally.report.period import plan_chunks


class PrometheusError(Exception):
    """Prometheus could not be reached or refused a query; the message says which."""


# Told after each query for raw samples: (metric, ranges done, ranges planned, samples so far).
Progress = Callable[[str, int, int, int], None]


class PrometheusClient:
    def __init__(self, url: str, *, timeout: float = 60.0,
                 max_samples_per_query: int = 500_000, progress: Progress | None = None
                 ) -> None:
        self.url = url.rstrip("/")
        self.progress = progress
        if not self.url.startswith(("http://", "https://")):
            raise PrometheusError(f"not an http(s) URL: {url!r} (e.g. http://prometheus:9090)")
        self.max_samples_per_query = max_samples_per_query
        self.warnings: list[str] = []
        self.queries = 0
        try:
            self._http = httpx.Client(base_url=self.url, timeout=timeout)
        except httpx.InvalidURL as err:
            raise PrometheusError(f"not a valid URL: {url!r}: {err}") from err

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PrometheusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(self, promql: str, at_ms: int) -> dict[str, Any]:
        """POST /api/v1/query at a millisecond; the `data` object of a successful answer."""
        self.queries += 1
        try:
            resp = self._http.post("/api/v1/query",
                                   data={"query": promql, "time": f"{at_ms / 1000:.3f}"})
        except httpx.HTTPError as err:
            raise PrometheusError(f"cannot reach Prometheus at {self.url}: {err}") from err
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "status" not in body:
            raise PrometheusError(f"{resp.request.url}: HTTP {resp.status_code}, not a "
                                  "Prometheus API answer (is the URL Prometheus' base URL?)")
        if body["status"] != "success":
            raise PrometheusError(f"Prometheus refused {promql!r}: "
                                  f"{body.get('errorType', 'error')}: {body.get('error', '')}")
        for warning in body.get("warnings") or ():
            if warning not in self.warnings:
                self.warnings.append(str(warning))
        data = body.get("data")
        if not isinstance(data, dict):
            raise PrometheusError(f"Prometheus answered {promql!r} without data")
        return data

    def _result(self, promql: str, at_ms: int, kind: str) -> list[dict[str, Any]]:
        data = self.query(promql, at_ms)
        result = data.get("result")
        if data.get("resultType") != kind or not isinstance(result, list):
            raise PrometheusError(f"Prometheus answered {promql!r} with a "
                                  f"{data.get('resultType')}, not a {kind}")
        return result

    def count_samples(self, metric: str, start_ms: int, end_ms: int) -> int:
        result = self._result(f"sum(count_over_time({metric}[{end_ms - start_ms}ms]))",
                              end_ms - 1, "vector")
        return int(float(result[0]["value"][1])) if result else 0

    def raw_samples(self, metric: str, start_ms: int, end_ms: int) -> Iterator[SeriesSamples]:
        total = self.count_samples(metric, start_ms, end_ms)
        if not total:
            if self.progress:
                self.progress(metric, 0, 0, 0)
            return
        chunks = plan_chunks(start_ms, end_ms, total, self.max_samples_per_query)
        seen = 0
        for i, (a, b) in enumerate(chunks, 1):
            for series in self._result(f"{metric}[{b - a}ms]", b - 1, "matrix"):
                samples = []
                for ts, value in series["values"]:
                    ms = round(float(ts) * 1000)
                    if a <= ms < b:
                        samples.append((ms, float(value)))
                seen += len(samples)
                yield series["metric"], samples
            if self.progress:
                self.progress(metric, i, len(chunks), seen)
