"""Domain XML on the agent: hostdevs, the checks of a received domain, its own volumes.

Pure functions over strings; no libvirt import. What management fills in a
domain, and the managed ``<hostdev>`` element, are in
``hostdev.messages.domain_template``.
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass

from hostdev.messages.domain_template import (
    TEMPLATE_NS,
    BaseImage,
    bind_memory,
    hostdev_element,
    minimal_template,
    render_domain,
)
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import VmSpec

_HOSTDEV_PATH = "./devices/hostdev[@type='pci']"
#: How many domain XMLs ``read_hostdevs`` remembers the answer for: a host's
#: domains, live and persistent, several times over.
HOSTDEVS_CACHED = 512
_SETTINGS = f"{{{TEMPLATE_NS}}}template"
_VOLUME = f"{{{TEMPLATE_NS}}}volume"


@dataclass(frozen=True)
class OwnVolume:
    """A VM's own copy-on-write volume, as its domain's metadata records it."""

    pool: str
    volume: str
    #: The base image (a volume of the same pool) it is a copy of.
    base: str


def hostdev_xml(address: PciAddress) -> str:
    """Returns the ``<hostdev>`` XML that attaches or detaches ``address``."""
    return ET.tostring(hostdev_element(address), encoding="unicode")


def with_numatune(xml: str, node: int) -> str:
    """Returns the domain XML with its memory bound to ``node`` (any other binding replaced)."""
    root = ET.fromstring(xml)
    bind_memory(root, node)
    return ET.tostring(root, encoding="unicode")


def build_domain_xml(spec: VmSpec, *, domain_type: str = "kvm") -> str:
    """Builds the minimal domain (no template) with the spec's PCI devices passed through.

    Args:
        spec: identity, size, PCI addresses and NUMA node (if any) of the VM.
        domain_type: libvirt's domain type, ``kvm`` (or ``qemu``) for real
            hosts, ``test`` for the test driver.
    """
    return render_domain(minimal_template(domain_type), spec)


def hostdev_address(hostdev: ET.Element) -> PciAddress | None:
    """Returns the source address of a PCI ``<hostdev>`` element, None when unreadable."""
    element = hostdev.find("./source/address")
    if element is None:
        return None
    try:
        return PciAddress.from_parts(*(int(element.get(part, "0"), 0)
                                       for part in ("domain", "bus", "slot", "function")))
    except ValueError:
        return None


@functools.lru_cache(maxsize=HOSTDEVS_CACHED)
def read_hostdevs(xml: str) -> tuple[PciAddress, ...]:
    """Returns the PCI addresses of a domain's hostdevs, in XML order.

    Remembered by the exact text: the agent reads the XML of every domain on
    the host for each command that hands out devices (is another domain
    holding one?), and a domain's XML rarely changes, so most reads are of a
    text parsed before. The same text always gives the same (immutable) answer.
    """
    root = ET.fromstring(xml)
    found = (hostdev_address(h) for h in root.findall(_HOSTDEV_PATH))
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
            if hostdev_address(hostdev) == address:
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


def domain_refusal(xml: str, spec: VmSpec) -> str | None:
    """Says why the agent will not define a domain management sent, or None.

    The domain must parse, carry the spec's uuid and name, and pass through
    exactly the devices management assigned: a hostdev of any other kind or
    address is refused, whatever else the XML says.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        return f"the domain XML does not parse ({exc})"
    if read_identity(xml) != (spec.uuid, spec.name):
        return (f"the domain XML is for {read_identity(xml)[1]!r} "
                f"({read_identity(xml)[0]}), not {spec.name!r} ({spec.uuid})")
    assigned = set(spec.pci_devices)
    foreign = [h for h in root.iter("hostdev")
               if h.get("type") != "pci" or hostdev_address(h) not in assigned]
    foreign += [i for i in root.iter("interface") if i.get("type") == "hostdev"]
    if foreign:
        shown = ", ".join(str(hostdev_address(h) or h.get("type")) for h in foreign)
        return (f"the domain XML passes through {shown}, which management did not assign; "
                "only assigned devices are passed through")
    missing = assigned - set(read_hostdevs(xml))
    if missing:
        return (f"the domain XML lacks the assigned device(s) "
                f"{', '.join(sorted(str(a) for a in missing))}")
    return None


def with_domain_type(xml: str, host_type: str) -> str:
    """Returns the domain with the type this host runs.

    ``test`` on a simulated host (which then drops ``<emulator>``, a path the
    test driver does not have); ``qemu`` (TCG) where a template asks for
    ``kvm`` on a host without KVM; otherwise the template's own type.
    """
    root = ET.fromstring(xml)
    wanted = root.get("type", host_type)
    if host_type == "test":
        wanted = "test"
        devices = root.find("devices")
        for emulator in devices.findall("emulator") if devices is not None else ():
            devices.remove(emulator)  # type: ignore[union-attr]
    elif host_type == "qemu" and wanted == "kvm":
        wanted = "qemu"
    if root.get("type") == wanted:
        return xml
    root.set("type", wanted)
    return ET.tostring(root, encoding="unicode")


def with_own_volumes(xml: str, vm_uuid: str, images: Iterable[BaseImage]) -> str:
    """Points each base-image disk at the VM's own volume and records the base in metadata.

    The record (``<hostdev:volume pool= volume= base= target=/>``) is what
    destroy deletes and what migration checks on the destination.
    """
    by_target = {image.target: image for image in images}
    if not by_target:
        return xml
    root = ET.fromstring(xml)
    for disk in root.findall("./devices/disk[@type='volume']"):
        target, source = disk.find("target"), disk.find("source")
        image = by_target.get(target.get("dev", "") if target is not None else "")
        if image is None or source is None:
            continue
        source.set("volume", image.own_volume(vm_uuid))
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", {"name": "qemu"})
        driver.set("type", "qcow2")  # the own volume is a qcow2 overlay, whatever the base
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.Element("metadata")
        root.insert(0, metadata)
    settings = metadata.find(_SETTINGS)
    if settings is None:
        settings = ET.SubElement(metadata, _SETTINGS)
    for old in settings.findall(_VOLUME):
        settings.remove(old)
    for image in by_target.values():
        ET.SubElement(settings, _VOLUME, {"pool": image.pool, "volume": image.own_volume(vm_uuid),
                                          "base": image.volume, "target": image.target})
    return ET.tostring(root, encoding="unicode")


def read_own_volumes(xml: str) -> tuple[OwnVolume, ...]:
    """Returns the VM's own volumes recorded in a domain's metadata."""
    root = ET.fromstring(xml)
    return tuple(OwnVolume(pool=v.get("pool", ""), volume=v.get("volume", ""),
                           base=v.get("base", ""))
                 for v in root.findall(f"./metadata/{_SETTINGS}/{_VOLUME}"))
