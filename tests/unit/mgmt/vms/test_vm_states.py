"""Tests of the pure VM state machine."""

from __future__ import annotations

import pytest

from hostdev.mgmt.errors import InvalidTransition
from hostdev.mgmt.vms.vm_states import STATES, VmEvent, is_allowed, next_state


@pytest.mark.parametrize(("state", "event", "after"), [
    ("Stopped", VmEvent.START_REQUESTED, "Starting"),
    ("Starting", VmEvent.OPERATION_SUCCEEDED, "Running"),
    ("Starting", VmEvent.OPERATION_FAILED, "Stopped"),
    ("Running", VmEvent.STOP_REQUESTED, "Stopping"),
    ("Stopping", VmEvent.OPERATION_SUCCEEDED, "Stopped"),
    ("Running", VmEvent.MIGRATION_REQUESTED, "Migrating"),
    ("Migrating", VmEvent.OPERATION_SUCCEEDED, "Running"),
    ("Migrating", VmEvent.OPERATION_FAILED, "Running"),
    ("Running", VmEvent.FOLLOW_AGENT_POWER_OFF, "Stopped"),
])
def test_design_transitions(state: str, event: VmEvent, after: str) -> None:
    """Every transition leads where the state machine says."""
    assert next_state(state, event) == after  # type: ignore[arg-type]


def test_destroy_from_any_live_state() -> None:
    """DestroyRequested is allowed from every state but Destroyed."""
    for state in STATES:
        assert is_allowed(state, VmEvent.DESTROY_REQUESTED) == (state != "Destroyed")


def test_invalid_transition_says_what_is_allowed() -> None:
    """Starting a running VM is refused with the states that allow it."""
    with pytest.raises(InvalidTransition,
                       match="VM web1 is Running: StartRequested is allowed only when it is "
                             "Stopped, Error"):
        next_state("Running", VmEvent.START_REQUESTED, vm="web1")


def test_destroyed_is_final() -> None:
    """No event leaves Destroyed."""
    assert not any(is_allowed("Destroyed", event) for event in VmEvent)
