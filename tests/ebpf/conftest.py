"""Fixtures for the eBPF agent's tests: root, bcc, a cgroup subtree of the test's own."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from support.ebpf_agent import TestCgroup


@pytest.fixture
def cgroup() -> Iterator[TestCgroup]:
    """A cgroup v2 subtree for the test's processes (the agent traces only these)."""
    if os.geteuid() != 0:
        pytest.fail("the eBPF agent tests need root (make test runs as root)")
    cg = TestCgroup()
    try:
        yield cg
    finally:
        cg.cleanup()
