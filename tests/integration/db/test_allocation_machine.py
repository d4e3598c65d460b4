"""The hardware rules hold under random allocation streams on MariaDB (see tests/support)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from sqlalchemy import Engine

from tests.support.allocation_machine import AllocationMachine

pytestmark = pytest.mark.mariadb


def test_random_allocation_streams_keep_the_hardware_rules(engine: Engine) -> None:
    """Deploys, stops, migrations, disables and reports never break a rule on MariaDB either."""
    AllocationMachine.engine = engine
    run_state_machine_as_test(AllocationMachine, settings=settings(
        max_examples=20, stateful_step_count=20, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))
