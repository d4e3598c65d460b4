"""An operator's changes to one device: disable and enable."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select, update

from hostdev.messages.values import DeviceState
from hostdev.mgmt.devices.device_rows import (
    DEVICES,
    DISABLED,
    FREE,
    REMOVED,
    C,
    address_of,
    state_is,
)
from hostdev.mgmt.errors import Conflict, NotFound
from hostdev.mgmt.persistence.models import VmInstance, utcnow


class DeviceNotFound(NotFound):
    """No device has the id a request names."""


class DeviceBusy(Conflict):
    """An admin change needs a free device, and this one is held or gone."""


def disable_device(conn: Connection, device_id: int, reason: str = "") -> DeviceState:
    """Takes a free device out of service, keeping ``reason``; idempotent. Returns its state.

    Raises:
        DeviceNotFound: no device has this id.
        DeviceBusy: the device is held, reserved, quarantined or removed; the
            text names the VM that holds it.
    """
    result = conn.execute(
        update(DEVICES)
        .where(C.id == device_id, state_is(FREE))
        .values(state=DISABLED, reason=reason, updated_at=utcnow())
    )
    if result.rowcount == 1:
        return DISABLED
    row = _device_row(conn, device_id)
    if row.state == DISABLED:
        return DISABLED
    holder = row.instance_id if row.instance_id is not None else row.reserved_for
    if row.state == REMOVED:
        what = "no longer in its host's inventory (pci.devices); nothing to disable"
    else:
        vm = conn.execute(select(VmInstance.name, VmInstance.uuid)
                          .where(VmInstance.id == holder)).first()
        by = f" by VM {vm.name} ({vm.uuid})" if vm is not None else ""
        what = f"{row.state}{by}; only a free device can be disabled: stop or migrate its VM first"
    raise DeviceBusy(f"device {address_of(row)} ({row.name}) is {what}")


def enable_device(conn: Connection, device_id: int) -> DeviceState:
    """Puts a disabled device back in service; a no-op in any other state. Returns its state.

    Raises:
        DeviceNotFound: no device has this id.
    """
    result = conn.execute(
        update(DEVICES)
        .where(C.id == device_id, state_is(DISABLED))
        .values(state=FREE, reason="", updated_at=utcnow())
    )
    if result.rowcount == 1:
        return FREE
    state: DeviceState = _device_row(conn, device_id).state
    return state


def _device_row(conn: Connection, device_id: int) -> Any:
    row = conn.execute(select(DEVICES).where(C.id == device_id)).first()
    if row is None:
        raise DeviceNotFound(f"no PCI device has id {device_id}; list devices to find its id")
    return row
