"""The hardware rules hold under random allocation streams, on SQLite (see tests/support)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from sqlalchemy import Engine

from hostdev.mgmt.persistence.database import create_database_engine
from tests.support.allocation_machine import AllocationMachine
from tests.support.databases import sqlite_database


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """Opens a migrated SQLite file for the machine's examples."""
    folder: Path = tmp_path_factory.mktemp("machine")
    with sqlite_database(folder) as url:
        engine = create_database_engine(url)
        yield engine
        engine.dispose()


def test_random_allocation_streams_keep_the_hardware_rules(engine: Engine) -> None:
    """Deploys, stops, migrations, disables and reports never break a hardware rule."""
    AllocationMachine.engine = engine
    run_state_machine_as_test(AllocationMachine, settings=settings(
        max_examples=60, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))
