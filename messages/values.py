"""Values nested in messages: devices, domains, VM specs, rows of API answers."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from hostdev.messages.base import PowerState, Value
from hostdev.messages.limits import (
    MAX_DEVICES,
    MAX_PCI_REQUESTS,
    MAX_ROWS,
    Amount,
    BigAmount,
    Count,
    Cpus,
    Details,
    DeviceName,
    DomainName,
    DomainXml,
    FilePath,
    Guid,
    HardwareName,
    HexId,
    Id,
    IommuGroup,
    Label,
    LongDetails,
    MemoryMb,
    NumaNode,
    PciAddresses,
    PciClass,
    Reason,
    TemplateName,
    Timestamp,
    Uuid,
    VmName,
    Word,
)
from hostdev.messages.pci_address import PciAddress

#: ``unavailable``: free, but not offered (a rule of docs/devices.md keeps it back; its
#: reason says which); ``cleaning``: released, waiting for its host's reset.
DeviceState = Literal[
    "free", "allocated", "reserved", "quarantined", "disabled", "removed", "unavailable",
    "cleaning",
]
HostStatus = Literal["Up", "Disconnected", "Down", "PrepareForMaintenance", "Maintenance"]
VmState = Literal[
    "Stopped", "Starting", "Running", "Stopping", "Migrating", "Destroyed", "Error"
]
MigrationPolicy = Literal["forbid", "detach-attach"]
#: Where an offering wants its VM's devices: all on one NUMA node (``required``), on one
#: when a host can (``preferred``), or anywhere (``none``).
NumaPolicy = Literal["required", "preferred", "none"]
JobState = Literal["pending", "running", "succeeded", "failed"]


class PciDeviceInfo(Value, frozen=True, kw_only=True):
    """One passthrough device as an agent reports it."""

    address: PciAddress
    name: DeviceName
    vendor_id: HexId = ""
    product_id: HexId = ""
    iommu_group: IommuGroup | None = None
    vendor: HardwareName = ""
    product: HardwareName = ""
    class_code: PciClass = 0
    numa_node: NumaNode | None = None
    #: Every device of the IOMMU group, this one included, listed in pci.devices or not.
    iommu_members: PciAddresses = ()
    #: The physical function of a virtual function (SR-IOV); None for any other device.
    physical_function: PciAddress | None = None
    #: The virtual functions of a physical function (SR-IOV); empty for any other device.
    virtual_functions: PciAddresses = ()
    #: The host driver bound to the device (``vfio-pci``), "" when none.
    driver: Word = ""
    #: Why the agent keeps the device from being offered ("" when it may be):
    #: e.g. its IOMMU group has a member that is not in pci.devices.
    withheld: Reason = ""


class DomainInfo(Value, frozen=True, kw_only=True):
    """One libvirt domain on a host: identity, power state, PCI hostdevs."""

    uuid: Uuid
    name: DomainName
    state: PowerState
    hostdevs: PciAddresses = ()


class VmSpec(Value, frozen=True, kw_only=True):
    """What an agent needs to define and start a VM."""

    uuid: Uuid
    name: VmName
    cpus: Cpus
    memory_mb: MemoryMb
    pci_devices: PciAddresses = ()
    #: The host NUMA node the guest's memory is kept on (offering policy ``required``).
    numa_node: NumaNode | None = None


class DeviceOutcome(Value, frozen=True, kw_only=True):
    """The result of attaching or detaching one device."""

    address: PciAddress
    result: Literal["ok", "error"]
    details: Details = ""


class PciRequest(Value, frozen=True, kw_only=True):
    """N devices of one name, as an offering asks for them."""

    name: DeviceName
    count: Count = 1


#: The device requests of one offering, at most one per device name.
PciRequests = Annotated[tuple[PciRequest, ...], msgspec.Meta(max_length=MAX_PCI_REQUESTS)]


class HostRow(Value, frozen=True, kw_only=True):
    """A host as the API lists it."""

    id: Id
    guid: Guid
    name: Label
    status: HostStatus
    cpus: Amount
    memory_mb: BigAmount
    last_ping: Timestamp | None = None
    free_devices: Amount = 0
    total_devices: Amount = 0
    #: Domains its last complete report listed that management did not place there.
    foreign_domains: Amount = 0
    #: Why the host is in its status (what keeps it preparing for maintenance), "" if nothing.
    status_reason: Details = ""
    #: Its agent resets every device a VM lets go of (``pci.reset.on.release``).
    reset_on_release: bool = False


class PciDeviceRow(Value, frozen=True, kw_only=True):
    """A passthrough device as the API lists it."""

    id: Id
    host_guid: Guid
    host_name: Label
    address: PciAddress
    name: Label
    state: DeviceState
    vm_uuid: Uuid | None = None
    vendor_id: HexId = ""
    product_id: HexId = ""
    iommu_group: IommuGroup | None = None
    vendor: HardwareName = ""
    product: HardwareName = ""
    class_code: PciClass = 0
    numa_node: NumaNode | None = None
    iommu_members: PciAddresses = ()
    physical_function: PciAddress | None = None
    virtual_functions: PciAddresses = ()
    driver: Word = ""
    #: Why the device is in its state: who disabled it and why, which rule keeps it
    #: unavailable, why it was quarantined; "" when nothing needs saying.
    reason: Reason = ""
    #: Why the agent withholds the device from offer, "" when it does not.
    withheld: Reason = ""


class OfferingRow(Value, frozen=True, kw_only=True):
    """A service offering as the API lists it."""

    id: Id
    name: Label
    cpus: Amount
    memory_mb: BigAmount
    pci_requests: PciRequests = ()
    migration_policy: MigrationPolicy = "forbid"
    numa_policy: NumaPolicy = "none"
    #: The domain template its VMs are built from; "" for the minimal domain.
    template: Label = ""


class VmRow(Value, frozen=True, kw_only=True):
    """A VM as the API lists it."""

    uuid: Uuid
    name: Label
    offering: Label
    state: VmState
    host_guid: Guid | None = None
    host_name: Label | None = None
    pci_devices: PciAddresses = ()
    #: The NUMA node its devices were placed on, None when its offering has no policy.
    numa_node: NumaNode | None = None
    #: The template and version it was built from ("" and None without one).
    template: Label = ""
    template_version: Amount | None = None
    #: The file its serial console is written to on its host ("" when none).
    console_path: FilePath = ""


class TemplateRow(Value, frozen=True, kw_only=True):
    """A domain template as the API lists it: its newest version unless asked."""

    name: TemplateName
    version: Amount
    created_at: Timestamp = ""
    #: The offerings naming the template.
    offerings: Annotated[tuple[Label, ...], msgspec.Meta(max_length=MAX_ROWS)] = ()
    #: The template itself; "" in lists.
    xml: DomainXml = ""


class JobRow(Value, frozen=True, kw_only=True):
    """A job as the API reports it."""

    id: Id
    kind: Word
    state: JobState
    vm_uuid: Uuid | None = None
    step: Word = ""
    details: LongDetails = ""
    created_at: Timestamp = ""
    finished_at: Timestamp | None = None


class HostVerdict(Value, frozen=True, kw_only=True):
    """Why one host was accepted or rejected for a placement."""

    host_guid: Guid
    host_name: Label
    accepted: bool
    reason: Details = ""


class DeviceMapping(Value, frozen=True, kw_only=True):
    """One device moved by a migration: source address to destination address."""

    name: Label
    source: PciAddress
    destination: PciAddress


class MaintenanceMove(Value, frozen=True, kw_only=True):
    """A VM that maintenance moves off its host: where to, which device replaces which."""

    vm_uuid: Uuid
    vm_name: Label
    destination_guid: Guid
    destination_name: Label
    devices: Annotated[tuple[DeviceMapping, ...], msgspec.Meta(max_length=MAX_DEVICES)] = ()
    #: The migrate job that moves it (None in a dry run).
    job_id: Id | None = None


class MaintenanceHold(Value, frozen=True, kw_only=True):
    """A VM whose offering forbids migration: it keeps the host busy until it stops."""

    vm_uuid: Uuid
    vm_name: Label
    offering: Label
    devices: PciAddresses = ()
    #: The stop job ``--stop`` began (None without ``--stop`` or in a dry run).
    stop_job_id: Id | None = None
