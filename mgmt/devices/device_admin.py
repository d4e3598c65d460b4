"""An operator's changes to one device: disable (out of service) and enable (back)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select, update

from hostdev.messages.values import DeviceState
from hostdev.mgmt.devices import host_rules
from hostdev.mgmt.devices.availability import RULED_STATES
from hostdev.mgmt.devices.device_rows import (
    CLEANING,
    DEVICES,
    DISABLED,
    FREE,
    QUARANTINED,
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
    """An admin change needs a device no VM holds, and this one is held or gone."""


def disable_device(conn: Connection, device_id: int, reason: str = "") -> DeviceState:
    """Takes a device no VM holds (free or unavailable) out of service, keeping ``reason``.

    Idempotent. Returns its state. On a host with device rules, the other
    members of its IOMMU group become unavailable.

    Raises:
        DeviceNotFound: no device has this id.
        DeviceBusy: the device is held, reserved, quarantined, cleaning or
            removed; the text names the VM that holds it.
    """
    row = _device_row(conn, device_id)
    ruled = host_rules.serialize(conn, row.host_id)
    result = conn.execute(
        update(DEVICES)
        .where(C.id == device_id, C.state.in_(sorted(RULED_STATES)))
        .values(state=DISABLED, reason=reason, updated_at=utcnow())
    )
    if result.rowcount == 1:
        if ruled:
            host_rules.apply_rules(conn, row.host_id)
        return DISABLED
    row = _device_row(conn, device_id)
    if row.state == DISABLED:
        return DISABLED
    holder = row.instance_id if row.instance_id is not None else row.reserved_for
    if row.state == REMOVED:
        what = "no longer in its host's inventory (pci.devices); nothing to disable"
    elif row.state == CLEANING:
        what = ("cleaning: its agent is resetting it after its last VM; disable it once the "
                "reset ends (it is free then)")
    elif row.state == QUARANTINED and holder is None:
        what = ("quarantined: its reset failed; `hostdev device enable` asks for the reset "
                "again, and a device that stays faulty can be disabled once it is free")
    else:
        vm = conn.execute(select(VmInstance.name, VmInstance.uuid)
                          .where(VmInstance.id == holder)).first()
        by = f" by VM {vm.name} ({vm.uuid})" if vm is not None else ""
        what = (f"{row.state}{by}; only a device no VM holds can be disabled: stop or "
                "migrate its VM first")
    raise DeviceBusy(f"device {address_of(row)} ({row.name}) is {what}")


def enable_device(conn: Connection, device_id: int) -> DeviceState:
    """Puts a disabled device back in service; a no-op in any other state. Returns its state.

    The device is free again, or unavailable when a hardware rule keeps it
    (its IOMMU group, its PF or VFs, its agent withholding it).

    Raises:
        DeviceNotFound: no device has this id.
    """
    row = _device_row(conn, device_id)
    ruled = host_rules.serialize(conn, row.host_id)
    result = conn.execute(
        update(DEVICES)
        .where(C.id == device_id, state_is(DISABLED))
        .values(state=FREE, reason="", updated_at=utcnow())
    )
    if result.rowcount == 1 and ruled:
        host_rules.apply_rules(conn, row.host_id)
    state: DeviceState = _device_row(conn, device_id).state
    return state


def _device_row(conn: Connection, device_id: int) -> Any:
    row = conn.execute(select(DEVICES).where(C.id == device_id)).first()
    if row is None:
        raise DeviceNotFound(f"no PCI device has id {device_id}; list devices to find its id")
    return row
