"""The hardware rules on SQLite: the shared contract suite (see tests/support)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from hostdev.mgmt.persistence.database import create_database_engine
from tests.support.databases import sqlite_database
from tests.support.device_rules_contract import DeviceRulesContract


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """Opens a migrated SQLite file shared by this module's tests."""
    folder: Path = tmp_path_factory.mktemp("sqlite")
    with sqlite_database(folder) as url:
        engine = create_database_engine(url)
        yield engine
        engine.dispose()


class TestDeviceRulesOnSqlite(DeviceRulesContract):
    """Runs the hardware rules contract against SQLite."""
