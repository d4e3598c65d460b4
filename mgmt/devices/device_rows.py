"""The device table's one vocabulary: its columns, the address mapping, state tests, API rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from sqlalchemy import ColumnElement, Table, and_, func, literal_column

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DeviceState, PciDeviceInfo, PciDeviceRow
from hostdev.mgmt.persistence.database import RetryTransaction
from hostdev.mgmt.persistence.models import DEVICE_STATES, PciDevice

DEVICES: Final = cast(Table, PciDevice.__table__)
C: Final = DEVICES.c
# The states by name, for the places the type checker cannot see (SQL values,
# CASE results); ``DeviceState`` is their one spelling.
FREE: Final[DeviceState] = "free"
ALLOCATED: Final[DeviceState] = "allocated"
RESERVED: Final[DeviceState] = "reserved"
QUARANTINED: Final[DeviceState] = "quarantined"
DISABLED: Final[DeviceState] = "disabled"
REMOVED: Final[DeviceState] = "removed"
UNAVAILABLE: Final[DeviceState] = "unavailable"
CLEANING: Final[DeviceState] = "cleaning"
#: The columns that store an address, most significant first: ordering by
#: them orders devices by address.
ADDRESS_COLUMNS: Final = (C.domain, C.bus, C.slot, C.function)
#: The NUMA node a device counts on: a device whose host reports no node (NULL)
#: counts on one node, :data:`NO_NODE`, so a host without NUMA is one node.
NO_NODE: Final = -1
NUMA_NODE: Final = func.coalesce(C.numa_node, literal_column(str(NO_NODE)))
#: The columns :meth:`HeldDevice.of` reads.
DEVICE_COLUMNS: Final = (C.id, C.host_id, C.name, *ADDRESS_COLUMNS, C.state)


class ClaimRaceLost(RetryTransaction):
    """Another transaction took or locked a device between our read and our update.

    Attributes:
        written: rows this claim already changed in the caller's transaction
            (0 when it lost before writing, so the caller may try another host
            in the same transaction; otherwise it MUST roll back).
    """

    def __init__(self, reason: str, *, written: int = 0) -> None:
        super().__init__(reason)
        self.written = written


@dataclass(frozen=True, slots=True)
class HeldDevice:
    """A device with its place and its state, as claims, queries and migration plans pass it."""

    id: int
    host_id: int
    name: str
    address: PciAddress
    state: DeviceState

    @classmethod
    def of(cls, row: Sequence[Any]) -> HeldDevice:
        """Returns the device a row of :data:`DEVICE_COLUMNS` describes (a Row or a tuple)."""
        id_, host_id, name, domain, bus, slot, function, state = row
        return cls(id_, host_id, name, address_from(domain, bus, slot, function), state)


@dataclass(slots=True)
class DeviceCounts:
    """Devices of one name on one host, by state; ``total`` leaves out ``removed``."""

    host_id: int
    name: str
    free: int = 0
    allocated: int = 0
    reserved: int = 0
    quarantined: int = 0
    disabled: int = 0
    removed: int = 0
    unavailable: int = 0
    cleaning: int = 0

    @property
    def total(self) -> int:
        """Counts the devices still in the inventory (every state but ``removed``)."""
        return sum(getattr(self, state) for state in DEVICE_STATES if state != REMOVED)


def address_from(domain: str, bus: str, slot: str, function: str) -> PciAddress:
    """Returns the address the four address columns store."""
    return PciAddress(f"{domain}:{bus}:{slot}.{function}")


def address_of(row: Any) -> PciAddress:
    """Returns the address a device row stores (anything with the four address columns)."""
    return address_from(row.domain, row.bus, row.slot, row.function)


def address_columns(address: PciAddress) -> dict[str, str]:
    """Returns the column values that store ``address`` (lowercase hexadecimal)."""
    return {
        "domain": f"{address.domain:04x}",
        "bus": f"{address.bus:02x}",
        "slot": f"{address.slot:02x}",
        "function": f"{address.function:x}",
    }


def join_addresses(addresses: Sequence[str]) -> str:
    """Returns addresses as a list column stores them: canonical, comma-separated."""
    return ",".join(str(PciAddress(a)) for a in addresses)


def split_addresses(text: str) -> tuple[PciAddress, ...]:
    """Returns the addresses a list column stores."""
    return tuple(PciAddress(a) for a in text.split(",") if a)


def fact_columns(info: PciDeviceInfo) -> dict[str, Any]:
    """Returns the column values that store what an agent reports of a device, name aside."""
    pf = info.physical_function
    return {
        "vendor_id": info.vendor_id, "product_id": info.product_id,
        "iommu_group": info.iommu_group, "vendor": info.vendor, "product": info.product,
        "class_code": info.class_code, "numa_node": info.numa_node,
        "iommu_members": join_addresses(info.iommu_members),
        "physical_function": str(PciAddress(pf)) if pf is not None else None,
        "virtual_functions": join_addresses(info.virtual_functions), "driver": info.driver,
        "withheld": info.withheld,
    }


def address_is(address: PciAddress) -> ColumnElement[bool]:
    """Returns the condition that selects the device row at ``address``."""
    return and_(*(C[name] == value for name, value in address_columns(address).items()))


def state_is(state: DeviceState) -> ColumnElement[bool]:
    """Returns the condition ``state = <state>``; the type checker checks the state's spelling."""
    return C.state == state


def state_is_not(state: DeviceState) -> ColumnElement[bool]:
    """Returns the condition ``state <> <state>``."""
    return C.state != state


def api_row(device: PciDevice, host_guid: str, host_name: str,
            vm_uuid: str | None) -> PciDeviceRow:
    """Returns a device row as the API lists it."""
    return PciDeviceRow(
        id=device.id, host_guid=host_guid, host_name=host_name, address=address_of(device),
        name=device.name, state=device.state, vm_uuid=vm_uuid, vendor_id=device.vendor_id,
        product_id=device.product_id, iommu_group=device.iommu_group, vendor=device.vendor,
        product=device.product, class_code=device.class_code, numa_node=device.numa_node,
        iommu_members=split_addresses(device.iommu_members),
        physical_function=(PciAddress(device.physical_function)
                           if device.physical_function else None),
        virtual_functions=split_addresses(device.virtual_functions), driver=device.driver,
        reason=device.reason, withheld=device.withheld)
