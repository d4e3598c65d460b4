"""Fixtures shared by the management unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from hostdev.mgmt.persistence.database import create_database_engine
from tests.support.databases import sqlite_database


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """Opens a fresh migrated SQLite file for one test."""
    with sqlite_database(tmp_path) as url:
        engine = create_database_engine(url)
        yield engine
        engine.dispose()
