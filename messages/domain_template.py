"""Domain templates: what management fills in a libvirt domain, and what a domain needs.

A VM's domain is a template the operator uploaded (or, without one, the
minimal domain) with the elements management owns filled in by
``render_domain``, the one place that writes them: name, uuid, memory,
vCPUs, the assigned PCI hostdevs and the path of a file console. Management
renders, the agent defines what it receives; both read a domain's needs
(``read_needs``: networks, bridges, base images, shared storage) with the
functions here, so the two daemons agree on the format. Pure functions over
strings; ``xml.etree`` only.

hostdev's own settings in a template live in its ``<metadata>``, in the
namespace ``TEMPLATE_NS``::

    <metadata>
      <hostdev:template xmlns:hostdev="urn:hostdev:template:1">
        <hostdev:storage shared="no"/>
      </hostdev:template>
    </metadata>
"""

from __future__ import annotations

import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import VmSpec

#: The namespace of hostdev's settings in a domain's ``<metadata>``.
TEMPLATE_NS: Final = "urn:hostdev:template:1"
ET.register_namespace("hostdev", TEMPLATE_NS)
_SETTINGS = f"./metadata/{{{TEMPLATE_NS}}}template"

#: The top-level elements management owns: a template may not set them.
MANAGED_ELEMENTS: Final = ("name", "uuid", "memory", "currentMemory", "maxMemory", "vcpu",
                           "vcpus", "numatune")
#: Where a file console goes when the template names no directory for it.
DEFAULT_CONSOLE_DIR: Final = "/var/log/libvirt/qemu"
#: The consoles whose output can go to a file management names per VM.
_FILE_CONSOLES: Final = ("./devices/serial[@type='file']", "./devices/console[@type='file']")


def hostdev_element(address: PciAddress) -> ET.Element:
    """Builds one managed PCI ``<hostdev>`` element for ``address``.

    Always ``mode='subsystem' type='pci' managed='yes'``, so libvirt unbinds
    the device from its host driver on start and gives it back on stop.
    """
    hostdev = ET.Element("hostdev", {"mode": "subsystem", "type": "pci", "managed": "yes"})
    source = ET.SubElement(hostdev, "source")
    ET.SubElement(source, "address", {
        "domain": f"0x{address.domain:04x}",
        "bus": f"0x{address.bus:02x}",
        "slot": f"0x{address.slot:02x}",
        "function": f"0x{address.function:x}",
    })
    return hostdev


def numatune_element(node: int) -> ET.Element:
    """Builds ``<numatune><memory mode='strict' nodeset='N'/></numatune>``.

    The guest's memory is allocated on host NUMA node ``node`` only, the node
    of its passed-through devices (the offering's NUMA policy ``required``).
    """
    numatune = ET.Element("numatune")
    ET.SubElement(numatune, "memory", {"mode": "strict", "nodeset": str(node)})
    return numatune


def bind_memory(root: ET.Element, node: int | None) -> None:
    """Binds the domain's memory to ``node`` (any other binding replaced; None: unbound)."""
    for old in root.findall("numatune"):
        root.remove(old)
    if node is not None:
        vcpu = root.find("vcpu")
        root.insert(list(root).index(vcpu) + 1 if vcpu is not None else len(root),
                    numatune_element(node))


def minimal_template(domain_type: str = "kvm") -> str:
    """Returns the domain of a VM whose offering names no template: no disk, no NIC."""
    arch = " arch='x86_64'" if domain_type in ("kvm", "qemu") else ""
    return (f"<domain type='{domain_type}'><os><type{arch}>hvm</type></os>"
            "<devices/></domain>")


def unique_addresses(addresses: Iterable[PciAddress]) -> list[PciAddress]:
    """Returns each address once, in order (libvirt refuses a hostdev twice, code 27)."""
    return list(dict.fromkeys(PciAddress(a) for a in addresses))


def render_domain(template: str, spec: VmSpec, *, console_path: str = "") -> str:
    """Returns ``template`` with every element management owns filled from ``spec``.

    The one place that writes them: name, uuid, memory (MiB), vCPUs, one
    managed ``<hostdev>`` per assigned address, the NUMA node the memory is
    bound to (when the spec names one), and ``console_path`` as the source of
    every file console (``console_path_for`` chooses it).
    """
    root = ET.fromstring(template)
    _set_top(root, 0, "name", spec.name)
    _set_top(root, 1, "uuid", spec.uuid)
    _set_top(root, 2, "memory", str(spec.memory_mb), unit="MiB")
    _set_top(root, 3, "vcpu", str(spec.cpus))
    bind_memory(root, spec.numa_node)
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    for address in unique_addresses(spec.pci_devices):
        devices.append(hostdev_element(address))
    if console_path:
        for path in _FILE_CONSOLES:
            for console in root.findall(path):
                source = console.find("source")
                if source is None:
                    source = ET.SubElement(console, "source")
                source.set("path", console_path)
    return ET.tostring(root, encoding="unicode")


def _set_top(root: ET.Element, index: int, tag: str, text: str, **attrs: str) -> None:
    """Sets a top-level element's text and attributes, inserting it at ``index`` if absent."""
    element = root.find(tag)
    if element is None:
        element = ET.Element(tag)
        root.insert(index, element)
    element.attrib.clear()
    element.attrib.update(attrs)
    element.text = text


def console_path_for(template: str, vm_uuid: str) -> str:
    """Returns the file a VM's console is written to, or "" when the template has none.

    ``<uuid>.console.log`` in the directory of the template's own path (so
    the operator chooses the directory), else in ``DEFAULT_CONSOLE_DIR``.
    """
    root = ET.fromstring(template)
    for path in _FILE_CONSOLES:
        for console in root.findall(path):
            source = console.find("source")
            given = source.get("path", "") if source is not None else ""
            directory = posixpath.dirname(given) if given else DEFAULT_CONSOLE_DIR
            return posixpath.join(directory or "/", f"{vm_uuid}.console.log")
    return ""


@dataclass(frozen=True)
class BaseImage:
    """A template disk's base image: a volume in a libvirt storage pool."""

    pool: str
    volume: str
    #: The disk's target device (``vda``): a VM's own volume is named after it.
    target: str

    def own_volume(self, vm_uuid: str) -> str:
        """Returns the name of the VM's copy-on-write volume on this base."""
        return f"{vm_uuid}-{self.target}.qcow2"


@dataclass(frozen=True)
class DomainNeeds:
    """What a domain needs from its host before it can be defined."""

    networks: tuple[str, ...] = ()
    bridges: tuple[str, ...] = ()
    base_images: tuple[BaseImage, ...] = ()
    #: The pool of the base images is shared between hosts: migration copies nothing.
    shared_storage: bool = False


def read_needs(xml: str) -> DomainNeeds:
    """Reads the networks, bridges, base images and storage setting of a domain."""
    root = ET.fromstring(xml)
    networks = [s.get("network", "") for s in
                root.findall("./devices/interface[@type='network']/source")]
    bridges = [s.get("bridge", "") for s in
               root.findall("./devices/interface[@type='bridge']/source")]
    images = []
    for disk in root.findall("./devices/disk[@type='volume']"):
        source, target = disk.find("source"), disk.find("target")
        if disk.get("device", "disk") != "disk" or source is None:
            continue  # a cdrom or floppy volume is read-only: shared as it is
        images.append(BaseImage(pool=source.get("pool", ""), volume=source.get("volume", ""),
                                target=target.get("dev", "") if target is not None else ""))
    storage = root.find(f"{_SETTINGS}/{{{TEMPLATE_NS}}}storage")
    shared = storage is not None and storage.get("shared", "no") == "yes"
    return DomainNeeds(networks=tuple(dict.fromkeys(networks)),
                       bridges=tuple(dict.fromkeys(bridges)),
                       base_images=tuple(images), shared_storage=shared)
