"""Fixtures for the database tests: one migrated MariaDB database per module; empty ones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from hostdev.mgmt.persistence.database import create_database_engine
from tests.support.databases import mariadb_database, sqlite_database


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


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Yields the URL of an empty database on each back end."""
    if request.param == "sqlite":
        with sqlite_database(tmp_path, migrate=False) as url:
            yield url
    else:
        with mariadb_database(migrate=False) as url:
            yield url
