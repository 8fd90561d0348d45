"""Fixtures of the operator's tests: kmock's Kubernetes emulator and a client for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.kube_emulator import RunningEmulator

from podtally.control.kube import Kube


@pytest.fixture
def emulator() -> Iterator[RunningEmulator]:
    with RunningEmulator() as emu:
        yield emu


@pytest.fixture
def kube(emulator: RunningEmulator) -> Iterator[Kube]:
    client = Kube.for_host(emulator.url, timeout=5.0)
    yield client
    client.close()
