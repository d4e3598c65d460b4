"""Domain XML on the agent: hostdevs read back and changed, a host's domain type.

Pure functions over strings; no libvirt import. What management fills in a
domain, and the managed ``<hostdev>`` element, are in
``hostdev.messages.domain_template``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hostdev.messages.domain_template import hostdev_element, minimal_template, render_domain
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import VmSpec

_HOSTDEV_PATH = "./devices/hostdev[@type='pci']"


def hostdev_xml(address: PciAddress) -> str:
    """Returns the ``<hostdev>`` XML that attaches or detaches ``address``."""
    return ET.tostring(hostdev_element(address), encoding="unicode")


def build_domain_xml(spec: VmSpec, *, domain_type: str = "kvm") -> str:
    """Builds the minimal domain (no template) with the spec's PCI devices passed through.

    Args:
        spec: identity, size and PCI addresses of the VM.
        domain_type: libvirt's domain type, ``kvm`` (or ``qemu``) for real
            hosts, ``test`` for the test driver.
    """
    return render_domain(minimal_template(domain_type), spec)


def _address_of(hostdev: ET.Element) -> PciAddress | None:
    element = hostdev.find("./source/address")
    if element is None:
        return None
    try:
        return PciAddress.from_parts(*(int(element.get(part, "0"), 0)
                                       for part in ("domain", "bus", "slot", "function")))
    except ValueError:
        return None


def read_hostdevs(xml: str) -> tuple[PciAddress, ...]:
    """Returns the PCI addresses of a domain's hostdevs, in XML order."""
    root = ET.fromstring(xml)
    found = (_address_of(h) for h in root.findall(_HOSTDEV_PATH))
    return tuple(a for a in found if a is not None)


def read_identity(xml: str) -> tuple[str, str]:
    """Returns the ``(uuid, name)`` of a domain XML."""
    root = ET.fromstring(xml)
    return root.findtext("uuid", "").strip(), root.findtext("name", "").strip()


def with_hostdev(xml: str, address: PciAddress) -> str:
    """Returns the domain XML with ``address`` added as a hostdev (unchanged if present)."""
    root = ET.fromstring(xml)
    if address in read_hostdevs(xml):
        return xml
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    devices.append(hostdev_element(address))
    return ET.tostring(root, encoding="unicode")


def without_hostdev(xml: str, address: PciAddress) -> str:
    """Returns the domain XML with the hostdev for ``address`` removed."""
    root = ET.fromstring(xml)
    devices = root.find("devices")
    if devices is not None:
        for hostdev in devices.findall("hostdev[@type='pci']"):
            if _address_of(hostdev) == address:
                devices.remove(hostdev)
    return ET.tostring(root, encoding="unicode")


def without_runtime_id(xml: str) -> str:
    """Strips the ``id`` attribute of a running domain's XML so it can be defined elsewhere."""
    root = ET.fromstring(xml)
    root.attrib.pop("id", None)
    return ET.tostring(root, encoding="unicode")


def pci_backends(domain_capabilities_xml: str) -> tuple[str, ...]:
    """Returns the PCI passthrough backends in libvirt's domain capabilities (``vfio``...).

    An empty ``<enum name='pciBackend'/>`` means the host cannot pass PCI
    devices through (no IOMMU or no vfio-pci): every VM with a hostdev would
    fail to start.
    """
    root = ET.fromstring(domain_capabilities_xml)
    return tuple((value.text or "").strip()
                 for value in root.findall("./devices/hostdev/enum[@name='pciBackend']/value"))
