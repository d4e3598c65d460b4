"""Fixtures for the MariaDB integration tests: one migrated database per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from hostdev.mgmt.persistence.database import create_database_engine
from tests.support.databases import mariadb_database


@pytest.fixture(scope="module")
def mariadb_url() -> Iterator[str]:
    """Creates a migrated ``hostdev_test_<random>`` database and drops it afterwards."""
    with mariadb_database() as url:
        yield url


@pytest.fixture(scope="module")
def engine(mariadb_url: str) -> Iterator[Engine]:
    """Opens an engine on the module's MariaDB database."""
    engine = create_database_engine(mariadb_url)
    yield engine
    engine.dispose()
