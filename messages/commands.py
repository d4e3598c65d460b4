"""Commands between agents and management, with their typed answers."""

from __future__ import annotations

from typing import ClassVar, Literal

from hostdev.messages.base import Answer, Message, PowerState
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DeviceOutcome, DomainInfo, PciDeviceInfo, VmSpec

# -- agent to management -------------------------------------------------------


class StartupRoutingCommand(Message, frozen=True, kw_only=True):
    """An agent announces itself: host facts, its passthrough devices, its domains.

    Sent at start-up and again after every reconnect; management reconciles
    the inventory and VM list from it and answers ``StartupAnswer``.
    """

    guid: str
    name: str
    hypervisor: str = "kvm"
    hypervisor_version: str = ""
    cpus: int
    memory_mb: int
    pci_devices: tuple[PciDeviceInfo, ...] = ()
    domains: tuple[DomainInfo, ...] = ()
    agent_version: str = ""
    #: The libvirt URI other hosts migrate domains to this host with
    #: (``MigrateCommand.destination_uri``), e.g. ``qemu+tcp://kvm-01/system``.
    migration_uri: str = ""


class PingRoutingCommand(Message, frozen=True, kw_only=True):
    """Periodic heartbeat with every domain's power state and hostdevs."""

    guid: str
    domains: tuple[DomainInfo, ...] = ()


class VmStateReport(Message, frozen=True, kw_only=True):
    """Pushed on a libvirt lifecycle event for one domain."""

    guid: str
    vm_uuid: str
    vm_name: str = ""
    state: PowerState
    event: str = ""
    hostdevs: tuple[PciAddress, ...] = ()


# -- management to agent --------------------------------------------------------


class StartupAnswer(Answer, frozen=True, kw_only=True):
    """Management accepted (or refused) an agent's start-up."""

    host_id: int = 0
    ping_interval_s: float = 60.0


class StartCommand(Message, frozen=True, kw_only=True):
    """Define and start a VM with the given PCI devices passed through."""

    vm: VmSpec


class StartAnswer(Answer, frozen=True, kw_only=True):
    """Outcome of ``StartCommand``; ``hostdevs`` are those the domain holds."""

    vm_uuid: str
    hostdevs: tuple[PciAddress, ...] = ()


class StopCommand(Message, frozen=True, kw_only=True):
    """Stop a VM: gracefully within ``timeout_s``, or at once when ``force``."""

    vm_uuid: str
    force: bool = False
    timeout_s: float = 60.0
    undefine: bool = False


class StopAnswer(Answer, frozen=True, kw_only=True):
    """Outcome of ``StopCommand``; ``state`` is the domain's power state after."""

    vm_uuid: str
    state: PowerState = "unknown"


class MigrateCommand(Message, frozen=True, kw_only=True):
    """Detach every hostdev of a VM, then live-migrate it to another host.

    The agent reads the hostdevs from the domain XML. A refused detach
    re-attaches those already detached and cancels the migration; a failed
    migration re-attaches all of them on the source.
    """

    vm_uuid: str
    destination_guid: str
    destination_uri: str
    detach_timeout_s: float = 10.0
    migrate_timeout_s: float = 300.0


MigrateStep = Literal["detach", "migrate", ""]


class MigrateAnswer(Answer, frozen=True, kw_only=True):
    """Outcome of ``MigrateCommand``: what was detached, what was put back."""

    vm_uuid: str
    failed_step: MigrateStep = ""
    refused_device: PciAddress | None = None
    detached: tuple[PciAddress, ...] = ()
    reattached: tuple[PciAddress, ...] = ()


class AttachPciDevicesCommand(Message, frozen=True, kw_only=True):
    """Attach host PCI devices to a running VM (live and persistent config)."""

    vm_uuid: str
    addresses: tuple[PciAddress, ...]
    timeout_s: float = 10.0


class AttachPciDevicesAnswer(Answer, frozen=True, kw_only=True):
    """One outcome per device; a device already attached counts as success."""

    vm_uuid: str
    devices: tuple[DeviceOutcome, ...] = ()


class DetachPciDevicesCommand(Message, frozen=True, kw_only=True):
    """Detach host PCI devices from a VM, waiting for the guest to release each."""

    vm_uuid: str
    addresses: tuple[PciAddress, ...]
    timeout_s: float = 10.0


class DetachPciDevicesAnswer(Answer, frozen=True, kw_only=True):
    """One outcome per device; a device already detached counts as success."""

    vm_uuid: str
    devices: tuple[DeviceOutcome, ...] = ()


class ErrorAnswer(Answer, frozen=True, kw_only=True):
    """Sent back when a message could not be decoded or handled at all.

    ``code`` is machine-readable (``decode``, ``forbidden``, ``not_found``,
    ``conflict``, ``invalid``, ``timeout``, ``internal``).
    """

    kind: ClassVar[str] = "answer"

    result: Literal["ok", "error"] = "error"
    code: str = "error"
