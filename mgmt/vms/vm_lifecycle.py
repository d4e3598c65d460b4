"""Applies VM transitions in the database and runs the transition listeners.

A transition is a conditional UPDATE on ``(state, update_count)`` checked by
row count: when another daemon moved the VM first, ``StaleVmState`` asks the
caller for a new transaction. Listeners run in the same transaction, before
(``pre_transition``, may veto by raising) and after the UPDATE
(``post_transition``). ``PciDeviceManager`` is one: it claims the offering's
devices on the VM's host when the VM enters Starting and releases them when
it enters Stopped, Destroyed or Error; under the offering's NUMA policy it
records the node its devices went to (``numa_node``). Every transition writes a
``VmStateChanged`` event (``vm.<uuid>.<State>``) to the outbox, and moves the
VM's CPUs and memory on its host's ``used_*`` columns (``capacity``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

import structlog
from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm.attributes import set_committed_value

from hostdev.messages.events import PciDeviceAllocated, PciDeviceReleased, VmStateChanged
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import NumaPolicy, PciRequest, VmState
from hostdev.mgmt.devices import cleaning, numa, pci_devices
from hostdev.mgmt.devices.device_rows import ALLOCATED
from hostdev.mgmt.devices.pci_devices import HeldDevice
from hostdev.mgmt.errors import Conflict
from hostdev.mgmt.persistence.database import PreparedStatement, RetryTransaction
from hostdev.mgmt.persistence.models import (
    Host,
    ServiceOffering,
    ServiceOfferingPciRequest,
    VmInstance,
    utcnow,
)
from hostdev.mgmt.persistence.unit_of_work import TxContext
from hostdev.mgmt.vms import capacity
from hostdev.mgmt.vms.vm_states import RELEASES_DEVICES, VmEvent, next_state

log = structlog.get_logger()


class StaleVmState(RetryTransaction):
    """The VM changed under us (another daemon moved it first); retry in a new transaction."""


class TransitionListener(Protocol):
    """Reacts to VM transitions inside the transaction that makes them.

    Listeners MUST only touch the database through ``tx`` (its connection or
    its session, so a rollback undoes them) and MAY raise to veto the transition.
    """

    def pre_transition(self, tx: TxContext, vm: VmInstance, event: VmEvent,
                       old: VmState, new: VmState) -> None:
        """Runs before the UPDATE; ``vm`` still shows the old state."""

    def post_transition(self, tx: TxContext, vm: VmInstance, event: VmEvent,
                        old: VmState, new: VmState) -> None:
        """Runs after the UPDATE; ``vm`` shows the new state."""


_KEEP = object()

_VM_UPDATES: dict[tuple[str, ...], PreparedStatement] = {}


def _vm_update(keys: tuple[str, ...]) -> PreparedStatement:
    """Returns the conditional UPDATE of a VM on ``(state, update_count)`` setting ``keys``."""
    statement = _VM_UPDATES.get(keys)
    if statement is None:
        vms = cast(Table, VmInstance.__table__)
        table = vms.c
        statement = PreparedStatement(
            update(vms)
            .where(table.id == bindparam("vm_id"), table.state == bindparam("old_state"),
                   table.update_count == bindparam("old_count"))
            .values({key: bindparam(f"new_{key}") for key in keys}))
        _VM_UPDATES[keys] = statement
    return statement


class VmLifecycleManager:
    """Moves VMs through the state machine with conditional UPDATEs and listeners."""

    def __init__(self, listeners: Sequence[TransitionListener] = ()) -> None:
        self._listeners = list(listeners)

    def transition(self, tx: TxContext, vm: VmInstance, event: VmEvent, *,
                   host_id: int | object | None = _KEEP) -> VmState:
        """Applies ``event`` to ``vm`` in the session's transaction; returns the new state.

        Pre-listeners may record the VM's NUMA node (``vm.numa_node``); the
        UPDATE writes it, and clears it when the VM lets go of its devices.

        Args:
            tx: the caller's transaction.
            vm: the VM as read in this transaction.
            event: what happened.
            host_id: the host the VM is placed on (with StartRequested).

        Raises:
            InvalidTransition: the event is not allowed in the VM's state.
            StaleVmState: the row changed since it was read (retry).
        """
        old: VmState = vm.state
        new = next_state(old, event, vm=vm.name)
        old_host = vm.host_id
        values: dict[str, object] = {"state": new, "update_count": vm.update_count + 1,
                                     "updated_at": utcnow()}
        if host_id is not _KEEP:
            # Pre-listeners see the target host (PciDeviceManager claims there).
            previous_host = vm.host_id
            set_committed_value(vm, "host_id", host_id)
            values["host_id"] = host_id
        numa_node = vm.numa_node
        try:
            for listener in self._listeners:
                listener.pre_transition(tx, vm, event, old, new)
        except BaseException:
            if host_id is not _KEEP:
                set_committed_value(vm, "host_id", previous_host)
            raise
        if vm.numa_node != numa_node:
            values["numa_node"] = vm.numa_node
        if new in RELEASES_DEVICES and vm.numa_node is not None:
            values["numa_node"] = None
        if new in ("Stopped", "Destroyed") and vm.host_id is not None:
            values["host_id"] = None
            values["last_host_id"] = vm.host_id
        values.update(tx.vm_values.pop(vm.id, {}))  # columns waiting for this UPDATE
        params = {f"new_{key}": value for key, value in values.items()}
        params.update(vm_id=vm.id, old_state=old, old_count=vm.update_count)
        result = _vm_update(tuple(values)).execute(tx.connection, params)
        if result.rowcount != 1:
            raise StaleVmState(f"VM {vm.name} changed while {event.value} was applied; "
                               "retrying")
        for key, value in values.items():
            set_committed_value(vm, key, value)
        capacity.moved(tx.connection, vm, (old_host, old), (vm.host_id, new))
        for listener in self._listeners:
            listener.post_transition(tx, vm, event, old, new)
        host_ref = vm.host_id if vm.host_id is not None else vm.last_host_id
        host_guid = host_guid_of(tx, host_ref) if host_ref is not None else None
        tx.outbox.add(f"vm.{vm.uuid}.{new}",
                   VmStateChanged(vm_uuid=vm.uuid, state=new, previous=old,
                                  host_guid=host_guid, at=utcnow().isoformat() + "Z"))
        log.info("vm_state_changed", vm=vm.uuid, name=vm.name, vm_event=event.value,
                 previous=old, state=new)
        return new


_HOST_GUID = PreparedStatement(select(Host.guid).where(Host.id == bindparam("host_id")))
_OFFERING_REQUESTS = PreparedStatement(
    select(ServiceOffering.numa_policy, ServiceOfferingPciRequest.name,
           ServiceOfferingPciRequest.count)
    .select_from(ServiceOffering)
    .outerjoin(ServiceOfferingPciRequest,
               ServiceOfferingPciRequest.offering_id == ServiceOffering.id)
    .where(ServiceOffering.id == bindparam("offering_id"))
    .order_by(ServiceOfferingPciRequest.id))


def host_guid_of(tx: TxContext, host_id: int) -> str:
    """Returns a host's guid (read once per transaction: a host id never changes guid)."""
    guid = tx.host_guids.get(host_id)
    if guid is None:
        rows = _HOST_GUID.execute(tx.connection, {"host_id": host_id}).rows
        guid = rows[0][0] if rows else ""
        if guid:
            tx.host_guids[host_id] = guid
    return guid


def _read_offering(tx: TxContext, offering_id: int) -> None:
    """Reads an offering's PCI requests and NUMA policy into the transaction's caches."""
    rows = _OFFERING_REQUESTS.execute(tx.connection, {"offering_id": offering_id}).rows
    tx.offering_requests[offering_id] = tuple(PciRequest(name=name, count=int(count))
                                              for _, name, count in rows if name is not None)
    tx.offering_numa[offering_id] = rows[0][0] if rows else "none"


def offering_requests(tx: TxContext, offering_id: int) -> tuple[PciRequest, ...]:
    """Returns the PCI requests of an offering, by name (read once per transaction)."""
    if offering_id not in tx.offering_requests:
        _read_offering(tx, offering_id)
    return tx.offering_requests[offering_id]


def offering_numa_policy(tx: TxContext, offering_id: int) -> NumaPolicy:
    """Returns the NUMA policy of an offering (read with its PCI requests, once)."""
    if offering_id not in tx.offering_numa:
        _read_offering(tx, offering_id)
    return tx.offering_numa[offering_id]


class PciDeviceManager:
    """Claims a VM's devices when it starts and releases them when it stops.

    Every claim is a conditional UPDATE on rows seen free, checked by row
    count, so any number of management daemons can share the database.
    """

    def pre_transition(self, tx: TxContext, vm: VmInstance, event: VmEvent,
                       old: VmState, new: VmState) -> None:
        """Claims on Starting, before the VM row changes: a refused claim vetoes it."""
        if new == "Starting":
            if vm.host_id is None:
                raise Conflict(f"VM {vm.name} is Starting without a host")
            self.claim(tx, vm, vm.host_id)

    def post_transition(self, tx: TxContext, vm: VmInstance, event: VmEvent,
                        old: VmState, new: VmState) -> None:
        """Releases on Stopped, Destroyed and Error."""
        if new in RELEASES_DEVICES:
            self.release(tx, vm)

    def claim(self, tx: TxContext, vm: VmInstance, host_id: int) -> tuple[HeldDevice, ...]:
        """Allocates the offering's devices on ``host_id`` to ``vm``, all or nothing.

        Under the offering's NUMA policy the devices go on one node when it
        requires (or prefers and can), recorded in ``vm.numa_node`` for the
        transition's UPDATE.

        Raises:
            InsufficientDevices: the host has too few free devices of a name.
            ClaimRaceLost: a device was taken between the read and the UPDATE.
        """
        requests = {r.name: r.count for r in offering_requests(tx, vm.offering_id)}
        if not requests:
            return ()
        policy = offering_numa_policy(tx, vm.offering_id)
        held, node = numa.take_on_node(tx.connection, vm.id, host_id, requests, policy)
        set_committed_value(vm, "numa_node", node)
        tx.claimed[vm.id] = tuple(sorted((d.address for d in held), key=str))
        host_guid = host_guid_of(tx, host_id)
        at = utcnow().isoformat() + "Z"
        for device in held:
            tx.outbox.add(f"pci.{host_guid}.Allocated",
                       PciDeviceAllocated(host_guid=host_guid, address=device.address,
                                          name=device.name, vm_uuid=vm.uuid, at=at))
        return held

    def release(self, tx: TxContext, vm: VmInstance) -> int:
        """Frees every device ``vm`` holds or has reserved; quarantined ones become removed.

        On a host that resets released devices, the held ones become cleaning
        and its agent is asked to reset them (``hostdev.mgmt.devices.cleaning``).
        """
        released = pci_devices.release_devices(tx.connection, vm.id)
        # A device a guest had goes cleaning on a host that resets it: ask for the reset.
        cleaning.request_resets_on(tx, {d.host_id for d, _ in released if d.state == ALLOCATED})
        at = utcnow().isoformat() + "Z"
        for device, guid in released:
            if guid:  # read by the release: the VmStateChanged event needs no query
                tx.host_guids.setdefault(device.host_id, guid)
            tx.outbox.add(f"pci.{guid}.Released",
                       PciDeviceReleased(host_guid=guid, address=device.address,
                                         name=device.name, vm_uuid=vm.uuid, at=at))
        return len(released)

    def held_addresses(self, tx: TxContext, vm_id: int) -> tuple[PciAddress, ...]:
        """Returns the addresses of the devices a VM holds, in id order."""
        claimed = tx.claimed.get(vm_id)
        if claimed is not None:  # claimed in this transaction
            return claimed
        return tuple(device.address
                     for device in pci_devices.devices_of_vm(tx.connection, vm_id)
                     if device.state == ALLOCATED)
