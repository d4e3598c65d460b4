"""Domain XML: building domains with PCI hostdevs and reading hostdevs back.

Pure functions over strings; no libvirt import. A hostdev is always
``<hostdev mode='subsystem' type='pci' managed='yes'>`` so libvirt unbinds the
device from its host driver on start and gives it back on stop.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import VmSpec

_HOSTDEV_PATH = "./devices/hostdev[@type='pci']"


def hostdev_element(address: PciAddress) -> ET.Element:
    """Builds one managed PCI ``<hostdev>`` element for ``address``."""
    hostdev = ET.Element("hostdev", {"mode": "subsystem", "type": "pci", "managed": "yes"})
    source = ET.SubElement(hostdev, "source")
    ET.SubElement(source, "address", {
        "domain": f"0x{address.domain:04x}",
        "bus": f"0x{address.bus:02x}",
        "slot": f"0x{address.slot:02x}",
        "function": f"0x{address.function:x}",
    })
    return hostdev


def hostdev_xml(address: PciAddress) -> str:
    """Returns the ``<hostdev>`` XML that attaches or detaches ``address``."""
    return ET.tostring(hostdev_element(address), encoding="unicode")


def numatune_element(node: int) -> ET.Element:
    """Builds ``<numatune><memory mode='strict' nodeset='N'/></numatune>``.

    The guest's memory is allocated on host NUMA node ``node`` only, the node
    of its passed-through devices (the offering's NUMA policy ``required``).
    """
    numatune = ET.Element("numatune")
    ET.SubElement(numatune, "memory", {"mode": "strict", "nodeset": str(node)})
    return numatune


def with_numatune(xml: str, node: int) -> str:
    """Returns the domain XML with its memory bound to ``node`` (any other binding replaced)."""
    root = ET.fromstring(xml)
    for old in root.findall("numatune"):
        root.remove(old)
    vcpu = root.find("vcpu")
    root.insert(list(root).index(vcpu) + 1 if vcpu is not None else len(root),
                numatune_element(node))
    return ET.tostring(root, encoding="unicode")


def build_domain_xml(spec: VmSpec, *, domain_type: str = "kvm") -> str:
    """Builds the XML of a domain with the spec's PCI devices passed through.

    Args:
        spec: identity, size, PCI addresses and NUMA node (if any) of the VM.
        domain_type: libvirt's domain type, ``kvm`` (or ``qemu``) for real
            hosts, ``test`` for the test driver.
    """
    root = ET.Element("domain", {"type": domain_type})
    ET.SubElement(root, "name").text = spec.name
    ET.SubElement(root, "uuid").text = spec.uuid
    ET.SubElement(root, "memory", {"unit": "MiB"}).text = str(spec.memory_mb)
    ET.SubElement(root, "vcpu").text = str(spec.cpus)
    if spec.numa_node is not None:
        root.append(numatune_element(spec.numa_node))
    os_element = ET.SubElement(root, "os")
    type_attrs = {"arch": "x86_64"} if domain_type in ("kvm", "qemu") else {}
    ET.SubElement(os_element, "type", type_attrs).text = "hvm"
    devices = ET.SubElement(root, "devices")
    for address in _unique(spec.pci_devices):
        devices.append(hostdev_element(address))
    return ET.tostring(root, encoding="unicode")


def _unique(addresses: Iterable[PciAddress]) -> list[PciAddress]:
    # libvirt refuses the same hostdev twice (code 27); a repeated address in
    # a spec means "this device", once.
    return list(dict.fromkeys(PciAddress(a) for a in addresses))


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
