"""The VM state machine, as pure functions over values.

A transition is ``(state, event) -> new state``. Anything not in the table is
refused with an ``InvalidTransition`` that says which states allow the event.
The persistence side (``vm_lifecycle``) applies a transition as a conditional
UPDATE on ``(state, update_count)`` and runs the listeners.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, get_args

from hostdev.messages.values import VmState
from hostdev.mgmt.errors import InvalidTransition


class VmEvent(StrEnum):
    """What happens to a VM; the names follow CloudStack's ``VirtualMachine.Event``."""

    START_REQUESTED = "StartRequested"
    STOP_REQUESTED = "StopRequested"
    MIGRATION_REQUESTED = "MigrationRequested"
    DESTROY_REQUESTED = "DestroyRequested"
    OPERATION_SUCCEEDED = "OperationSucceeded"
    OPERATION_FAILED = "OperationFailed"
    #: The agent reports the domain is not running (drift or crash).
    FOLLOW_AGENT_POWER_OFF = "FollowAgentPowerOff"
    #: The agent reports the domain running where management thought it was not.
    FOLLOW_AGENT_POWER_ON = "FollowAgentPowerOn"
    #: Something left the VM in an unknown state (a stop that failed halfway).
    ERROR_OCCURRED = "ErrorOccurred"


STATES: Final[tuple[VmState, ...]] = get_args(VmState)

_E = VmEvent
TRANSITIONS: dict[tuple[VmState, VmEvent], VmState] = {
    ("Stopped", _E.START_REQUESTED): "Starting",
    ("Error", _E.START_REQUESTED): "Starting",
    ("Starting", _E.OPERATION_SUCCEEDED): "Running",
    ("Starting", _E.OPERATION_FAILED): "Stopped",
    ("Running", _E.STOP_REQUESTED): "Stopping",
    ("Stopping", _E.OPERATION_SUCCEEDED): "Stopped",
    # A stop that failed leaves the domain as it was: still running.
    ("Stopping", _E.OPERATION_FAILED): "Running",
    ("Running", _E.MIGRATION_REQUESTED): "Migrating",
    # Success: running on the new host; failure: running on the old one.
    ("Migrating", _E.OPERATION_SUCCEEDED): "Running",
    ("Migrating", _E.OPERATION_FAILED): "Running",
    # Power reports reconcile drift: a VM found stopped is Stopped.
    ("Running", _E.FOLLOW_AGENT_POWER_OFF): "Stopped",
    ("Stopping", _E.FOLLOW_AGENT_POWER_OFF): "Stopped",
    ("Error", _E.FOLLOW_AGENT_POWER_OFF): "Stopped",
    ("Stopped", _E.FOLLOW_AGENT_POWER_ON): "Running",
    ("Error", _E.FOLLOW_AGENT_POWER_ON): "Running",
    ("Starting", _E.FOLLOW_AGENT_POWER_ON): "Running",
}
for _state in STATES:
    if _state != "Destroyed":
        TRANSITIONS[(_state, _E.DESTROY_REQUESTED)] = "Destroyed"
        TRANSITIONS[(_state, _E.ERROR_OCCURRED)] = "Error"
del _state

#: States in which a VM holds its PCI devices.
HOLDS_DEVICES: frozenset[VmState] = frozenset({"Starting", "Running", "Stopping", "Migrating"})
#: States entered through which PciDeviceManager releases the VM's devices.
RELEASES_DEVICES: frozenset[VmState] = frozenset({"Stopped", "Destroyed", "Error"})


def allowed_from(event: VmEvent) -> tuple[VmState, ...]:
    """Returns the states in which ``event`` is allowed, in table order."""
    return tuple(state for state in STATES if (state, event) in TRANSITIONS)


def next_state(state: VmState, event: VmEvent, *, vm: str = "") -> VmState:
    """Returns the state ``event`` leads to from ``state``.

    Raises:
        InvalidTransition: the event is not allowed in ``state``; the text
            names the VM, its state and the states that allow the event.
    """
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        allowed = ", ".join(allowed_from(event)) or "no state"
        who = f"VM {vm} " if vm else "the VM "
        raise InvalidTransition(f"{who}is {state}: {event.value} is allowed only when it is "
                                f"{allowed}") from None


def is_allowed(state: VmState, event: VmEvent) -> bool:
    """Returns True when ``event`` may happen in ``state``."""
    return (state, event) in TRANSITIONS
