"""Makes a host's PCI device rows follow the inventory its agent reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, Final

from sqlalchemy import Connection, insert, select, update

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DeviceState, PciDeviceInfo
from hostdev.mgmt.devices import host_rules
from hostdev.mgmt.devices.availability import DeviceFacts, has_rules, rule_changes
from hostdev.mgmt.devices.device_rows import (
    ALLOCATED,
    CLEANING,
    DEVICES,
    FREE,
    QUARANTINED,
    REMOVED,
    RESERVED,
    UNAVAILABLE,
    C,
    address_columns,
    address_of,
    fact_columns,
    state_is_not,
)
from hostdev.mgmt.errors import InvalidRequest
from hostdev.mgmt.persistence.database import RetryTransaction
from hostdev.mgmt.persistence.literal_rows import insert_rows
from hostdev.mgmt.persistence.models import utcnow

#: What a device missing from its host's report becomes, by its state: a held
#: or reserved one is quarantined (its VM still names it), the others removed.
_GONE: Final[dict[DeviceState, DeviceState]] = {
    "free": "removed", "disabled": "removed", "unavailable": "removed",
    "allocated": "quarantined", "reserved": "quarantined",
}


@dataclass(frozen=True, slots=True)
class InventoryChanges:
    """What reconciling one host's reported inventory changed, by address."""

    added: tuple[PciAddress, ...] = ()
    renamed: tuple[PciAddress, ...] = ()
    removed: tuple[PciAddress, ...] = ()
    quarantined: tuple[PciAddress, ...] = ()
    restored: tuple[PciAddress, ...] = ()
    #: The devices waiting for their reset, in order (a reconciliation changes none).
    cleaning: tuple[PciAddress, ...] = ()


@dataclass(slots=True)
class _Reconciliation:
    added: list[PciAddress] = field(default_factory=list)
    renamed: list[PciAddress] = field(default_factory=list)
    removed: list[PciAddress] = field(default_factory=list)
    quarantined: list[PciAddress] = field(default_factory=list)
    restored: list[PciAddress] = field(default_factory=list)


def locks_rows(conn: Connection) -> bool:
    """True when the back end needs row locks to keep daemons apart."""
    # SQLite has one writer at a time (BEGIN IMMEDIATE): nothing to lock.
    return conn.dialect.name != "sqlite"


def reconcile_inventory(
    conn: Connection, host_id: int, reported: Sequence[PciDeviceInfo], *,
    new_host: bool = False,
) -> InventoryChanges:
    """Makes a host's device rows match what its agent reports, in the caller's transaction.

    New addresses are inserted free; a changed name or fact (ids, names, class,
    NUMA node, IOMMU group and members, PF/VF relation, driver) is updated
    (a held device keeps its VM); a device missing from the report becomes
    removed when free or disabled, quarantined when held or reserved (never
    deleted, never offered); a removed device that is reported again is free
    again, and a quarantined one goes back to its VM (allocated or reserved).
    Then the hardware rules are applied (``host_rules.refresh``): devices
    they keep from offer become unavailable, with the reason. Never commits.

    A host without device rows (``new_host``: one this transaction created,
    which nothing else can see yet, so nothing to lock or read) gets its
    inventory in one multi-row INSERT, each row already in the state and
    with the reason the rules give it.

    Raises:
        InvalidRequest: the report lists one address twice.
    """
    by_address = index_reported(f"host {host_id}", reported)
    if new_host:
        return _first_inventory(conn, host_id, by_address, new_host=True)
    host_rules.serialize_always(conn, host_id)  # the host row first, then its devices
    query = select(DEVICES).where(C.host_id == host_id)
    if locks_rows(conn):
        # Start-up is rare: lock the host's rows so claims wait for us.
        query = query.with_for_update()
    known = {address_of(row): row for row in conn.execute(query)}
    if not known:
        return _first_inventory(conn, host_id, by_address, new_host=False)
    now = utcnow()
    changes = _Reconciliation()
    new_rows = [
        {
            "host_id": host_id, "name": info.name, **address_columns(address),
            **fact_columns(info), "state": FREE,
            "created_at": now, "updated_at": now,
        }
        for address, info in sorted(by_address.items())
        if address not in known
    ]
    if new_rows:
        conn.execute(insert(DEVICES), new_rows)
        changes.added.extend(a for a in sorted(by_address) if a not in known)
    gone: dict[DeviceState, list[int]] = {"removed": [], "quarantined": []}
    for address, row in sorted(known.items()):
        report = by_address.get(address)
        if report is None:
            target = _GONE.get(row.state)
            if target is not None:
                gone[target].append(row.id)
                getattr(changes, target).append(address)
            continue
        values = _changed_values(row, report)
        if "name" in values:
            changes.renamed.append(address)
        values.update(_back(row))
        if "state" in values:
            changes.restored.append(address)
        if values:
            values["updated_at"] = now
            conn.execute(update(DEVICES).where(C.id == row.id).values(values))
    for target, ids in gone.items():
        if ids:
            conn.execute(
                update(DEVICES).where(C.id.in_(ids)).values(state=target, updated_at=now)
            )
    host_rules.refresh(conn, host_id)
    return InventoryChanges(
        added=tuple(changes.added), renamed=tuple(changes.renamed),
        removed=tuple(changes.removed), quarantined=tuple(changes.quarantined),
        restored=tuple(changes.restored),
        cleaning=tuple(address for address, row in sorted(known.items())
                       if row.state == CLEANING),
    )


def index_reported(host: str,
                   reported: Sequence[PciDeviceInfo]) -> dict[PciAddress, PciDeviceInfo]:
    """Returns a reported inventory by address.

    Raises:
        InvalidRequest: the report lists one address twice (``host`` names it).
    """
    by_address: dict[PciAddress, PciDeviceInfo] = {}
    for info in reported:
        address = PciAddress(info.address)
        if address in by_address:
            raise InvalidRequest(
                f"{host}: device {address} is reported twice (as "
                f"{by_address[address].name!r} and {info.name!r}); fix pci.devices"
            )
        by_address[address] = info
    return by_address


@dataclass(frozen=True)
class FirstInventory:
    """A host's first inventory, ruled: each device's state and reason, and the host's flag.

    Attributes:
        by_address: the reported devices (``index_reported``).
        addresses: their addresses, sorted.
        kept: the position (in ``addresses``) of each device the rules keep
            unavailable, with the reason.
        rules: what ``hosts.device_rules`` says for the host (``has_rules``).
    """

    by_address: dict[PciAddress, PciDeviceInfo]
    addresses: tuple[PciAddress, ...]
    kept: dict[int, str]
    rules: bool

    @classmethod
    def of(cls, by_address: dict[PciAddress, PciDeviceInfo]) -> FirstInventory:
        """Rules a reported inventory (``index_reported``) as the first of its host."""
        addresses = tuple(sorted(by_address))
        # The rules read facts by row id; before the INSERT, a row's position stands in.
        facts = [DeviceFacts(id=index, address=address, name=info.name, state=FREE,
                             iommu_group=info.iommu_group,
                             physical_function=(PciAddress(info.physical_function)
                                                if info.physical_function is not None
                                                else None),
                             withheld=info.withheld, numa_node=info.numa_node)
                 for index, (address, info) in enumerate((a, by_address[a]) for a in addresses)]
        return cls(by_address, addresses, rule_changes(facts).unavailable, has_rules(facts))

    @cached_property
    def values(self) -> list[tuple[Any, ...]]:
        """Returns each device's values, but its host and times, in the order of ``COLUMNS``."""
        kept = self.kept
        rows = [{"name": self.by_address[address].name, **address_columns(address),
                 **fact_columns(self.by_address[address]),
                 "state": UNAVAILABLE if index in kept else FREE, "reason": kept.get(index, "")}
                for index, address in enumerate(self.addresses)]
        return [tuple(row[name] for name in INVENTORY_COLUMNS) for row in rows]

    def rows(self, host_id: int, now: datetime) -> list[tuple[Any, ...]]:
        """Returns the ``pci_devices`` rows of the inventory on host ``host_id``, as ROW_COLUMNS."""
        return [(host_id, *values, now, now) for values in self.values]


#: The columns of a first inventory's device, but its host and times.
INVENTORY_COLUMNS: Final = ("name", "domain", "bus", "slot", "function", "vendor_id",
                            "product_id", "iommu_group", "vendor", "product", "class_code",
                            "numa_node", "iommu_members", "physical_function",
                            "virtual_functions", "driver", "withheld", "state", "reason")
#: The columns of :meth:`FirstInventory.rows`.
ROW_COLUMNS: Final = ("host_id", *INVENTORY_COLUMNS, "created_at", "updated_at")


def _first_inventory(conn: Connection, host_id: int,
                     by_address: dict[PciAddress, PciDeviceInfo], *,
                     new_host: bool) -> InventoryChanges:
    """Inserts the inventory of a host without device rows, ruled, in one statement."""
    inventory = FirstInventory.of(by_address)
    insert_rows(conn, DEVICES, ROW_COLUMNS, inventory.rows(host_id, utcnow()))
    if inventory.rules or not new_host:  # a new host's flag is already false
        host_rules.record_flag(conn, host_id, inventory.rules)
    return InventoryChanges(added=inventory.addresses)


def _back(row: Any) -> dict[str, DeviceState]:
    """Returns the state a device that is reported again takes back, if it changes."""
    if row.state == REMOVED:
        return {"state": FREE}
    if row.state == QUARANTINED and row.instance_id is not None:
        return {"state": ALLOCATED}
    if row.state == QUARANTINED and row.reserved_for is not None:
        return {"state": RESERVED}
    # Quarantined and held by nobody: its reset failed (hostdev.mgmt.devices.cleaning);
    # being reported says nothing about that, so it stays.
    return {}


def changes_row(row: Any, info: PciDeviceInfo) -> bool:
    """Tells whether reconciling a stored device row with what is reported of it writes it."""
    return bool(_changed_values(row, info) or _back(row))


def _changed_values(row: Any, info: PciDeviceInfo) -> dict[str, Any]:
    reported = {"name": info.name, **fact_columns(info)}
    return {key: value for key, value in reported.items() if getattr(row, key) != value}


#: The states of a device no VM holds, which a running domain's use may take over.
_ADOPTABLE: Final[tuple[DeviceState, ...]] = (FREE, UNAVAILABLE)


@dataclass(frozen=True, slots=True)
class Adoption:
    """What adopting a running domain's devices did: taken, or why not."""

    adopted: tuple[tuple[PciAddress, str], ...] = ()
    conflicts: tuple[str, ...] = ()


def adopt_devices(conn: Connection, host_id: int, vm_id: int,
                  addresses: Sequence[PciAddress]) -> Adoption:
    """Allocates to ``vm_id`` the inventory devices its running domain already holds.

    For a VM management thought stopped that a host reports running: the
    devices it really holds must not stay on offer. All or nothing: when one
    of them is held, reserved or disabled for anything else, nothing changes
    and ``conflicts`` says why. A device the hardware rules kept unavailable
    is adopted too (the domain has it), and the rules are applied after.
    Addresses outside the inventory are not hostdev's to track and are skipped.

    Raises:
        RetryTransaction: a device was taken between the read and the UPDATE.
    """
    wanted = {PciAddress(a) for a in addresses}
    ruled = host_rules.serialize(conn, host_id)
    query = select(DEVICES).where(C.host_id == host_id, state_is_not(REMOVED))
    if locks_rows(conn):
        query = query.with_for_update()
    rows = [row for row in conn.execute(query) if address_of(row) in wanted]
    conflicts = tuple(
        f"{address_of(row)} ({row.name}) is {row.state}"
        + (f" for VM id {row.instance_id or row.reserved_for}"
           if (row.instance_id or row.reserved_for) else "")
        for row in rows
        if not (row.state in _ADOPTABLE or (row.state == ALLOCATED and row.instance_id == vm_id))
    )
    if conflicts:
        return Adoption(conflicts=conflicts)
    free = [row for row in rows if row.state in _ADOPTABLE]
    if free:
        result = conn.execute(
            update(DEVICES).where(C.id.in_([row.id for row in free]),
                                  C.state.in_(_ADOPTABLE))
            .values(state=ALLOCATED, instance_id=vm_id, reason="", updated_at=utcnow()))
        if result.rowcount != len(free):
            raise RetryTransaction(f"a device of VM id {vm_id} was taken while it was adopted")
        if ruled:
            host_rules.apply_rules(conn, host_id)
    return Adoption(adopted=tuple((address_of(row), row.name) for row in free))
