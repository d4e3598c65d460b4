"""Values nested in messages: devices, domains, VM specs, rows of API answers."""

from __future__ import annotations

from typing import Literal

from hostdev.messages.base import PowerState, Value
from hostdev.messages.pci_address import PciAddress

DeviceState = Literal["free", "allocated", "reserved", "quarantined", "disabled", "removed"]
HostStatus = Literal["Up", "Disconnected", "Down", "Maintenance"]
VmState = Literal[
    "Stopped", "Starting", "Running", "Stopping", "Migrating", "Destroyed", "Error"
]
MigrationPolicy = Literal["forbid", "detach-attach"]
JobState = Literal["pending", "running", "succeeded", "failed"]


class PciDeviceInfo(Value, frozen=True, kw_only=True):
    """One passthrough device as an agent reports it."""

    address: PciAddress
    name: str
    vendor_id: str = ""
    product_id: str = ""
    iommu_group: int | None = None


class DomainInfo(Value, frozen=True, kw_only=True):
    """One libvirt domain on a host: identity, power state, PCI hostdevs."""

    uuid: str
    name: str
    state: PowerState
    hostdevs: tuple[PciAddress, ...] = ()


class VmSpec(Value, frozen=True, kw_only=True):
    """What an agent needs to define and start a VM."""

    uuid: str
    name: str
    cpus: int
    memory_mb: int
    pci_devices: tuple[PciAddress, ...] = ()


class DeviceOutcome(Value, frozen=True, kw_only=True):
    """The result of attaching or detaching one device."""

    address: PciAddress
    result: Literal["ok", "error"]
    details: str = ""


class PciRequest(Value, frozen=True, kw_only=True):
    """N devices of one name, as an offering asks for them."""

    name: str
    count: int = 1


class HostRow(Value, frozen=True, kw_only=True):
    """A host as the API lists it."""

    id: int
    guid: str
    name: str
    status: HostStatus
    cpus: int
    memory_mb: int
    last_ping: str | None = None
    free_devices: int = 0
    total_devices: int = 0
    #: Domains its last complete report listed that management did not place there.
    foreign_domains: int = 0


class PciDeviceRow(Value, frozen=True, kw_only=True):
    """A passthrough device as the API lists it."""

    id: int
    host_guid: str
    host_name: str
    address: PciAddress
    name: str
    state: DeviceState
    vm_uuid: str | None = None
    vendor_id: str = ""
    product_id: str = ""
    iommu_group: int | None = None


class OfferingRow(Value, frozen=True, kw_only=True):
    """A service offering as the API lists it."""

    id: int
    name: str
    cpus: int
    memory_mb: int
    pci_requests: tuple[PciRequest, ...] = ()
    migration_policy: MigrationPolicy = "forbid"


class VmRow(Value, frozen=True, kw_only=True):
    """A VM as the API lists it."""

    uuid: str
    name: str
    offering: str
    state: VmState
    host_guid: str | None = None
    host_name: str | None = None
    pci_devices: tuple[PciAddress, ...] = ()


class JobRow(Value, frozen=True, kw_only=True):
    """A job as the API reports it."""

    id: int
    kind: str
    state: JobState
    vm_uuid: str | None = None
    step: str = ""
    details: str = ""
    created_at: str = ""
    finished_at: str | None = None


class HostVerdict(Value, frozen=True, kw_only=True):
    """Why one host was accepted or rejected for a placement."""

    host_guid: str
    host_name: str
    accepted: bool
    reason: str = ""


class DeviceMapping(Value, frozen=True, kw_only=True):
    """One device moved by a migration: source address to destination address."""

    name: str
    source: PciAddress
    destination: PciAddress
