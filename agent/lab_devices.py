"""The lab option's stand-ins: an emulated PCI device for each passthrough address.

For a lab host without an IOMMU (``lab.emulated.devices=yes``; never in
production): each address of ``pci.devices`` is stood in for by an emulated
e1000 NIC (``<interface type='user'>``) that QEMU creates in the guest, so
everything but binding a host device to vfio-pci is real: the libvirt calls,
the guest's ACPI hot-plug and hot-unplug, the DEVICE_REMOVED events, the
timeouts, the migration.

A stand-in is recognised by its user alias, ``ua-hostdev-DDDD-BB-SS-F``
(the configured address), and given a MAC derived from that address, which
is what libvirt matches on detach. The n-th configured device (in address
order) sits at guest PCI slot ``0x10 + n`` of bus 0, where the guest sees
it as ``0000:00:<slot>.0``. Pure functions over strings; no libvirt import.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass

from hostdev.agent.domain_xml import hostdev_address, read_hostdevs
from hostdev.agent.pci_device import NodePciDevice
from hostdev.messages.pci_address import PciAddress

#: The user alias prefix that marks a stand-in (libvirt keeps ``ua-`` aliases).
ALIAS_PREFIX = "ua-hostdev-"
#: The guest slot of the first stand-in; 16 slots up to 0x1f.
FIRST_GUEST_SLOT = 0x10
MAX_STAND_INS = 0x20 - FIRST_GUEST_SLOT
#: A stand-in's own IOMMU group is this plus its index (it shares it with no one).
_GROUP_BASE = 1000


def alias_of(address: PciAddress) -> str:
    """Returns the user alias of the stand-in for ``address``."""
    return (f"{ALIAS_PREFIX}{address.domain:04x}-{address.bus:02x}-{address.slot:02x}-"
            f"{address.function:x}")


def address_of_alias(alias: str) -> PciAddress | None:
    """Returns the configured address a stand-in's alias names, None for any other alias."""
    if not alias.startswith(ALIAS_PREFIX):
        return None
    try:
        domain, bus, slot, function = (int(p, 16) for p in
                                       alias.removeprefix(ALIAS_PREFIX).split("-"))
        return PciAddress.from_parts(domain, bus, slot, function)
    except ValueError:
        return None


def read_stand_ins(xml: str) -> tuple[PciAddress, ...]:
    """Returns the configured addresses of a domain's stand-ins, in XML order."""
    root = ET.fromstring(xml)
    found = (address_of_alias(alias.get("name", ""))
             for alias in root.findall("./devices/interface/alias"))
    return tuple(a for a in found if a is not None)


def read_devices(xml: str) -> tuple[PciAddress, ...]:
    """Returns the passthrough addresses a domain holds: hostdevs and stand-ins."""
    return read_hostdevs(xml) + read_stand_ins(xml)


@dataclass(frozen=True)
class StandIns:
    """The stand-ins of one lab host, for the addresses of its ``pci.devices``."""

    addresses: tuple[PciAddress, ...]

    @classmethod
    def for_addresses(cls, addresses: Iterable[PciAddress]) -> StandIns:
        """Returns the stand-ins of these addresses; raises ``ValueError`` past 16."""
        ordered = tuple(sorted(set(addresses)))
        if len(ordered) > MAX_STAND_INS:
            raise ValueError(f"lab.emulated.devices stands in for at most {MAX_STAND_INS} "
                             f"devices (guest slots 0x10-0x1f); pci.devices lists "
                             f"{len(ordered)}")
        return cls(ordered)

    def guest_slot(self, address: PciAddress) -> int:
        """Returns the guest slot (bus 0) where the stand-in for ``address`` sits."""
        if address not in self.addresses:
            raise ValueError(f"{address} is not in pci.devices, so it has no stand-in")
        return FIRST_GUEST_SLOT + self.addresses.index(address)

    def element(self, address: PciAddress) -> ET.Element:
        """Builds the ``<interface>`` that stands in for ``address``."""
        interface = ET.Element("interface", {"type": "user"})
        mac = f"52:54:00:{address.bus:02x}:{address.slot:02x}:{address.function:02x}"
        ET.SubElement(interface, "mac", {"address": mac})
        ET.SubElement(interface, "model", {"type": "e1000"})
        ET.SubElement(interface, "alias", {"name": alias_of(address)})
        ET.SubElement(interface, "address", {
            "type": "pci", "domain": "0x0000", "bus": "0x00",
            "slot": f"0x{self.guest_slot(address):02x}", "function": "0x0"})
        return interface

    def device_xml(self, address: PciAddress) -> str:
        """Returns the XML that attaches or detaches the stand-in for ``address``."""
        return ET.tostring(self.element(address), encoding="unicode")

    def domain_with_stand_ins(self, xml: str) -> str:
        """Returns the domain with each listed ``<hostdev>`` replaced by its stand-in."""
        root = ET.fromstring(xml)
        devices = root.find("devices")
        if devices is None:
            return xml
        replaced = False
        for hostdev in devices.findall("hostdev[@type='pci']"):
            address = hostdev_address(hostdev)
            if address is not None and address in self.addresses:
                devices.remove(hostdev)
                devices.append(self.element(address))
                replaced = True
        return ET.tostring(root, encoding="unicode") if replaced else xml

    def node_devices(self) -> tuple[NodePciDevice, ...]:
        """Returns the host's PCI devices as the stand-ins make them: one e1000 per address."""
        return tuple(NodePciDevice(
            address=address, vendor_id="0x8086", product_id="0x100e",
            vendor="Intel Corporation", product="82540EM Gigabit Ethernet (emulated stand-in)",
            class_code=0x020000, iommu_group=_GROUP_BASE + index, iommu_members=(address,),
            driver="vfio-pci") for index, address in enumerate(self.addresses))
