"""Commands between agents and management, with their typed answers."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

from hostdev.messages.base import Answer, Message, PowerState
from hostdev.messages.limits import (
    MAX_DEVICES,
    MAX_DOMAINS,
    BootId,
    Cpus,
    Digest,
    DomainName,
    DomainXml,
    Guid,
    HostName,
    Id,
    MemoryMb,
    NumaNode,
    PciAddresses,
    Seconds,
    Seq,
    Uri,
    Uuid,
    Version,
    Word,
)
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DeviceOutcome, DomainInfo, PciDeviceInfo, VmSpec

#: The domains one report lists.
Domains = Annotated[tuple[DomainInfo, ...], msgspec.Meta(max_length=MAX_DOMAINS)]
#: The passthrough devices one host reports.
PciDeviceInfos = Annotated[tuple[PciDeviceInfo, ...], msgspec.Meta(max_length=MAX_DEVICES)]
#: One outcome per device of an attach or detach.
DeviceOutcomes = Annotated[tuple[DeviceOutcome, ...], msgspec.Meta(max_length=MAX_DEVICES)]

# -- agent to management -------------------------------------------------------


class StartupRoutingCommand(Message, frozen=True, kw_only=True):
    """An agent announces itself: host facts, its passthrough devices, its domains.

    Sent at start-up and again after every reconnect; management reconciles
    the inventory and VM list from it and answers ``StartupAnswer``.
    """

    guid: Guid
    name: HostName
    hypervisor: Word = "kvm"
    hypervisor_version: Version = ""
    cpus: Cpus
    memory_mb: MemoryMb
    pci_devices: PciDeviceInfos = ()
    domains: Domains = ()
    agent_version: Version = ""
    #: The libvirt URI other hosts migrate domains to this host with
    #: (``MigrateCommand.destination_uri``), e.g. ``qemu+tcp://kvm-01/system``.
    migration_uri: Uri = ""
    #: The agent process's boot id and this report's place in its sequence
    #: (shared with its answers): management applies a report only when it is
    #: newer than the last it applied for the host and than the last answer it
    #: accepted for each VM. Empty and 0 from an agent that predates them.
    boot_id: BootId = ""
    seq: Seq = 0
    #: The agent resets every device a VM lets go of (``pci.reset.on.release``):
    #: management keeps such a device ``cleaning`` until ``ResetPciDevicesAnswer``.
    pci_reset_on_release: bool = False


class PingRoutingCommand(Message, frozen=True, kw_only=True):
    """Periodic heartbeat with every domain's power state and hostdevs."""

    guid: Guid
    domains: Domains = ()
    #: The agent process's boot id and this report's place in its sequence
    #: (shared with its answers): management applies a report only when it is
    #: newer than the last it applied for the host and than the last answer it
    #: accepted for each VM. Empty and 0 from an agent that predates them.
    boot_id: BootId = ""
    seq: Seq = 0
    #: ``codec.domains_digest(domains)``: management skips reconciling a host whose
    #: report and VMs are as when it last reconciled them. Empty from an
    #: agent that predates it (reconciled at every ping).
    domains_digest: Digest = ""


class VmStateReport(Message, frozen=True, kw_only=True):
    """Pushed on a libvirt lifecycle event for one domain."""

    guid: Guid
    vm_uuid: Uuid
    vm_name: DomainName = ""
    state: PowerState
    event: Word = ""
    hostdevs: PciAddresses = ()
    #: The agent process's boot id and this report's place in its sequence
    #: (shared with its answers): management applies a report only when it is
    #: newer than the last it applied for the host and than the last answer it
    #: accepted for each VM. Empty and 0 from an agent that predates them.
    boot_id: BootId = ""
    seq: Seq = 0


# -- management to agent --------------------------------------------------------


class StartupAnswer(Answer, frozen=True, kw_only=True):
    """Management accepted (or refused) an agent's start-up."""

    host_id: Id = 0
    ping_interval_s: Seconds = 60.0


class StartCommand(Message, frozen=True, kw_only=True):
    """Define and start a VM with the given PCI devices passed through."""

    vm: VmSpec
    #: The domain management rendered from the offering's template
    #: (``hostdev.messages.domain_template``); "" for the minimal domain.
    domain_xml: DomainXml = ""


class StartAnswer(Answer, frozen=True, kw_only=True):
    """Outcome of ``StartCommand``; ``hostdevs`` are those the domain holds."""

    vm_uuid: Uuid
    hostdevs: PciAddresses = ()
    #: The agent's boot id and the answer's place in its sequence of reports
    #: and answers, so management can tell a report taken before this answer.
    boot_id: BootId = ""
    seq: Seq = 0


class StopCommand(Message, frozen=True, kw_only=True):
    """Stop a VM: gracefully within ``timeout_s``, or at once when ``force``."""

    vm_uuid: Uuid
    force: bool = False
    timeout_s: Seconds = 60.0
    undefine: bool = False


class StopAnswer(Answer, frozen=True, kw_only=True):
    """Outcome of ``StopCommand``; ``state`` is the domain's power state after."""

    vm_uuid: Uuid
    state: PowerState = "unknown"
    #: The agent's boot id and the answer's place in its sequence of reports
    #: and answers, so management can tell a report taken before this answer.
    boot_id: BootId = ""
    seq: Seq = 0


class MigrateCommand(Message, frozen=True, kw_only=True):
    """Detach every hostdev of a VM, then live-migrate it to another host.

    The agent reads the hostdevs from the domain XML. A refused detach
    re-attaches those already detached and cancels the migration; a failed
    migration re-attaches all of them on the source.
    """

    vm_uuid: Uuid
    destination_guid: Guid
    destination_uri: Uri
    detach_timeout_s: Seconds = 10.0
    migrate_timeout_s: Seconds = 300.0
    #: The host NUMA node the guest's memory is bound to on the destination (offering
    #: policy ``required``); None keeps the domain's binding as it is.
    numa_node: NumaNode | None = None


MigrateStep = Literal["detach", "migrate", ""]


class MigrateAnswer(Answer, frozen=True, kw_only=True):
    """Outcome of ``MigrateCommand``: what was detached, what was put back."""

    vm_uuid: Uuid
    failed_step: MigrateStep = ""
    refused_device: PciAddress | None = None
    detached: PciAddresses = ()
    reattached: PciAddresses = ()
    #: The agent's boot id and the answer's place in its sequence of reports
    #: and answers, so management can tell a report taken before this answer.
    boot_id: BootId = ""
    seq: Seq = 0


class AttachPciDevicesCommand(Message, frozen=True, kw_only=True):
    """Attach host PCI devices to a running VM (live and persistent config)."""

    vm_uuid: Uuid
    addresses: PciAddresses
    timeout_s: Seconds = 10.0


class AttachPciDevicesAnswer(Answer, frozen=True, kw_only=True):
    """One outcome per device; a device already attached counts as success."""

    vm_uuid: Uuid
    devices: DeviceOutcomes = ()
    #: The agent's boot id and the answer's place in its sequence of reports
    #: and answers, so management can tell a report taken before this answer.
    boot_id: BootId = ""
    seq: Seq = 0


class DetachPciDevicesCommand(Message, frozen=True, kw_only=True):
    """Detach host PCI devices from a VM, waiting for the guest to release each."""

    vm_uuid: Uuid
    addresses: PciAddresses
    timeout_s: Seconds = 10.0


class DetachPciDevicesAnswer(Answer, frozen=True, kw_only=True):
    """One outcome per device; a device already detached counts as success."""

    vm_uuid: Uuid
    devices: DeviceOutcomes = ()
    #: The agent's boot id and the answer's place in its sequence of reports
    #: and answers, so management can tell a report taken before this answer.
    boot_id: BootId = ""
    seq: Seq = 0


class ResetPciDevicesCommand(Message, frozen=True, kw_only=True):
    """Reset host PCI devices a VM let go of (libvirt's node device reset), one by one.

    Sent only to an agent that announced ``pci_reset_on_release``.
    """

    addresses: PciAddresses


class ResetPciDevicesAnswer(Answer, frozen=True, kw_only=True):
    """One outcome per device: ``ok`` when reset, ``error`` with why it was not."""

    devices: DeviceOutcomes = ()


class ErrorAnswer(Answer, frozen=True, kw_only=True):
    """Sent back when a message could not be decoded or handled at all.

    ``code`` is machine-readable (``decode``, ``forbidden``, ``not_found``,
    ``conflict``, ``invalid``, ``timeout``, ``internal``).
    """

    kind: ClassVar[str] = "answer"

    result: Literal["ok", "error"] = "error"
    code: Word = "error"
