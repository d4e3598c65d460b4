"""Start-up checks: the devices listed in ``agent.properties`` against the host.

Pure functions over the host's PCI node devices and domains, so they are
tested without libvirt:

- every listed address exists as a PCI node device (else an error naming it);
- a listed device whose IOMMU group holds other devices that are neither
  listed nor bridges (a partial group) is withheld from offer, with the
  reason, and fails ``--check``, unless ``pci.iommu.partial.groups=allow``
  (then a warning names them: passthrough takes the group);
- a listed device already used by a domain is reported with that domain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hostdev.agent.config import AgentConfig
from hostdev.agent.pci_device import NodePciDevice
from hostdev.messages.limits import MAX_LABEL
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DomainInfo, PciDeviceInfo

#: The key and value that let the agent offer devices of a partial IOMMU group.
ALLOW_PARTIAL_GROUPS = "pci.iommu.partial.groups=allow"


@dataclass(frozen=True)
class DeviceInUse:
    """A listed device that a domain already holds."""

    address: PciAddress
    name: str
    domain: DomainInfo

    def __str__(self) -> str:
        return (f"{self.address} ({self.name}) is used by domain {self.domain.name} "
                f"({self.domain.uuid}, {self.domain.state})")


@dataclass(frozen=True)
class CheckReport:
    """What the start-up checks found; ``ok`` is False when the agent must not start.

    ``partial_groups`` are refused IOMMU groups: the agent starts and reports
    their listed devices withheld, but ``--check`` fails on them.
    """

    inventory: tuple[PciDeviceInfo, ...]
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    in_use: tuple[DeviceInUse, ...] = ()
    partial_groups: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings allowed): the agent may start."""
        return not self.errors

    @property
    def passes(self) -> bool:
        """True when ``--check`` succeeds: no error and no refused partial group."""
        return self.ok and not self.partial_groups


def withheld_reason(group: int | None, strangers: list[PciAddress]) -> str:
    """Says why the devices of a partial IOMMU group are withheld (fits a ``Reason``)."""
    named = ", ".join(str(a) for a in strangers[:3]) + (" ..." if len(strangers) > 3 else "")
    reason = (f"IOMMU group {group} also holds {named}, not in pci.devices; list "
              f"{'them' if len(strangers) > 1 else 'it'} or set {ALLOW_PARTIAL_GROUPS}")
    return reason[:MAX_LABEL]


def check_host(config: AgentConfig, devices: Sequence[NodePciDevice],
               domains: Sequence[DomainInfo],
               backends: tuple[str, ...] | None = None) -> CheckReport:
    """Checks the configured devices against the host's node devices and domains.

    Args:
        config: the validated configuration.
        devices: every PCI node device of the host.
        domains: every domain with its hostdevs.
        backends: the host's PCI passthrough backends; () warns that none
            exists, None (unknown, e.g. the driver cannot tell) says nothing.
    """
    by_address = {device.address: device for device in devices}
    listed = {entry.address for entry in config.pci_devices}
    holders: dict[PciAddress, DomainInfo] = {}
    for domain in domains:
        for address in domain.hostdevs:
            # A running holder wins over a shut-off one: it is the one that matters now.
            if address not in holders or domain.state == "running":
                holders[address] = domain
    inventory: list[PciDeviceInfo] = []
    errors: list[str] = []
    warnings: list[str] = []
    in_use: list[DeviceInUse] = []
    partial: dict[int | None, str] = {}
    if backends == () and config.pci_devices:
        warnings.append(
            "libvirt reports no PCI passthrough backend (empty pciBackend in the domain "
            "capabilities): every VM given a device will fail to start; enable the IOMMU "
            "(intel_iommu=on or amd_iommu=on) and load vfio-pci")
    for entry in config.pci_devices:
        device = by_address.get(entry.address)
        if device is None:
            errors.append(
                f"{config.path}:{entry.line}: pci.devices lists {entry.address} "
                f"({entry.name}) but this host has no such PCI device (libvirt node device "
                f"{entry.address.libvirt_name} not found); correct the address "
                "(lspci -D shows them) or remove the entry")
            continue
        strangers = [
            member for member in device.iommu_members
            if member != entry.address and member not in listed
            and not (member in by_address and by_address[member].is_bridge)
        ]
        withheld = ""
        if strangers and config.partial_groups == "allow":
            warnings.append(
                f"{entry.address} ({entry.name}) shares IOMMU group {device.iommu_group} with "
                f"{', '.join(strangers)}, which are neither listed in pci.devices nor bridges; "
                f"offered anyway ({ALLOW_PARTIAL_GROUPS}): a VM given this device takes the "
                "whole group, which the host must not be using")
        elif strangers:
            withheld = withheld_reason(device.iommu_group, strangers)
            partial.setdefault(device.iommu_group, (
                f"{config.path}:{entry.line}: {entry.address} ({entry.name}) is withheld from "
                f"offer: {withheld}"))
        inventory.append(device.report(entry.name, withheld))
        if entry.address in holders:
            in_use.append(DeviceInUse(address=entry.address, name=entry.name,
                                      domain=holders[entry.address]))
    return CheckReport(inventory=tuple(inventory), errors=tuple(errors),
                       warnings=tuple(warnings), in_use=tuple(in_use),
                       partial_groups=tuple(partial.values()))
