"""A month of calls and of the eBPF agent's connection counts, and a real Prometheus serving
them, shared by the report's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import month
from support.prometheus import RunningPrometheus


@pytest.fixture(scope="session")
def calls() -> list[month.Call]:
    return month.make_calls()


@pytest.fixture(scope="session")
def connections() -> list[month.Connection]:
    return month.make_connections()


# Per module: no Prometheus outlives the tests that read it.
@pytest.fixture(scope="module")
def month_prometheus(calls: list[month.Call], connections: list[month.Connection],
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPrometheus]:
    series = {**month.series(calls), **month.agent_series(connections)}
    with RunningPrometheus(series, tmp_path_factory.mktemp("month")) as prom:
        yield prom
