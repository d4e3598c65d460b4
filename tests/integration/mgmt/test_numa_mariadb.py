"""NUMA policies with agents on simulated hosts, on MariaDB (see tests/support/numa_cloud.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from hostdev.mgmt.persistence.database import create_database_engine
from tests.support.agent import HostFactory, host_factory
from tests.support.databases import mariadb_database
from tests.support.numa_cloud import NumaCloudContract

pytestmark = [pytest.mark.mariadb, pytest.mark.libvirt]


@pytest.fixture
def engine() -> Iterator[Engine]:
    """A fresh migrated MariaDB database per test, dropped afterwards."""
    with mariadb_database("hostdev_numa") as url:
        engine = create_database_engine(url, pool_size=8)
        yield engine
        engine.dispose()


@pytest.fixture
def make_host(tmp_path: Path) -> Iterator[HostFactory]:
    """Opens simulated hosts and closes them after the test."""
    yield from host_factory(tmp_path)


class TestNumaOnMariaDb(NumaCloudContract):
    """Runs the NUMA scenarios on MariaDB."""
