"""NUMA policies with agents on simulated hosts, on SQLite (see tests/support/numa_cloud.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agent import HostFactory, host_factory
from tests.support.numa_cloud import NumaCloudContract

pytestmark = pytest.mark.libvirt


@pytest.fixture
def make_host(tmp_path: Path) -> Iterator[HostFactory]:
    """Opens simulated hosts and closes them after the test."""
    yield from host_factory(tmp_path)


class TestNumaOnSqlite(NumaCloudContract):
    """Runs the NUMA scenarios on SQLite (``engine`` from tests/unit/mgmt/conftest.py)."""
