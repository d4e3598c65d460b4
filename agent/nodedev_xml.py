"""Node-device XML: simulated-host specs turned into test-driver node XML, and PCI parsing.

A simulated host is described by a small JSON spec (devices with address,
vendor/product, IOMMU group, bridges; optional pre-existing domains; each
device a ``NodePciDevice``, the facts libvirt will report back) from
which ``build_node_xml`` writes the ``<node>`` file libvirt's ``test:///``
driver opens. ``parse_pci_device`` reads one ``nodeDevice.XMLDesc()`` back.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from hostdev.agent.errors import ConfigError
from hostdev.agent.pci_device import NodePciDevice
from hostdev.messages.domain_template import hostdev_element
from hostdev.messages.pci_address import PciAddress

TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
_TEST_NS = TEST_NS
_RUNSTATE_SHUTOFF = "5"


@dataclass(frozen=True)
class SimDomain:
    """A domain present on a simulated host when it starts."""

    name: str
    uuid: str
    running: bool = True
    cpus: int = 1
    memory_mb: int = 512
    hostdevs: tuple[PciAddress, ...] = ()


@dataclass(frozen=True)
class SimHostSpec:
    """A simulated host: size, PCI devices, domains, and injected failures."""

    name: str = "sim"
    cpus: int = 16
    memory_mb: int = 65536
    devices: tuple[NodePciDevice, ...] = ()
    domains: tuple[SimDomain, ...] = ()
    refuse_detach: frozenset[PciAddress] = field(default_factory=frozenset)
    fail_migration: str | None = None
    persist: bool = False
    #: Active libvirt networks, host bridges, and storage pools with their volumes
    #: (base images) that domain templates name.
    networks: tuple[str, ...] = ()
    bridges: tuple[str, ...] = ()
    pools: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def _pci_address(kind: type, value: Any) -> Any:
    """Decodes the PCI addresses of a spec; msgspec names the field of a bad one."""
    if kind is PciAddress and isinstance(value, str):
        return PciAddress(value)  # PciAddressError is a ValueError: msgspec adds the field
    raise TypeError(f"expected a PCI address such as 28:00.1, got {type(value).__name__}")


class _DeviceEntry(msgspec.Struct, forbid_unknown_fields=True):
    """A spec's device; an unnamed one is an Intel X710 function, a common 10GbE NIC."""

    address: PciAddress
    vendor_id: str = "0x8086"
    product_id: str = "0x1572"
    vendor: str = "Intel Corporation"
    product: str = "Ethernet Controller X710 for 10GbE SFP+"
    class_code: str = msgspec.field(name="class", default="0x020000")
    iommu_group: int | None = None
    parent: PciAddress | None = None
    numa_node: int | None = None
    #: Makes this device an SR-IOV virtual function of that physical function;
    #: the physical function lists it among its virtual functions.
    physical_function: PciAddress | None = None
    driver: str = ""

    def __post_init__(self) -> None:
        try:
            int(self.class_code, 0)
        except ValueError:
            raise ValueError(f"class {self.class_code!r} is not a number such as "
                             "0x020000") from None

    def device(self, virtual_functions: tuple[PciAddress, ...]) -> NodePciDevice:
        """Returns the device libvirt will report, with the virtual functions naming it."""
        return NodePciDevice(
            address=self.address, vendor_id=self.vendor_id, product_id=self.product_id,
            vendor=self.vendor, product=self.product, class_code=int(self.class_code, 0),
            iommu_group=self.iommu_group, parent=self.parent, numa_node=self.numa_node,
            physical_function=self.physical_function, virtual_functions=virtual_functions,
            driver=self.driver)


class _DomainEntry(msgspec.Struct, forbid_unknown_fields=True):
    """A spec's domain."""

    name: str
    uuid: str
    running: bool = True
    cpus: int = 1
    memory_mb: int = 512
    hostdevs: tuple[PciAddress, ...] = ()

    def domain(self) -> SimDomain:
        """Returns the domain the host starts with."""
        return SimDomain(name=self.name, uuid=self.uuid, running=self.running, cpus=self.cpus,
                         memory_mb=self.memory_mb, hostdevs=self.hostdevs)


class _SpecFile(msgspec.Struct, forbid_unknown_fields=True):
    """The JSON form of a simulated-host spec (see docs/agent.md, "Simulated hosts")."""

    name: str = "sim"
    cpus: int = 16
    memory_mb: int = 65536
    devices: tuple[_DeviceEntry, ...] = ()
    domains: tuple[_DomainEntry, ...] = ()
    refuse_detach: tuple[PciAddress, ...] = ()
    fail_migration: str | None = None
    persist: bool = False
    networks: tuple[str, ...] = ()
    bridges: tuple[str, ...] = ()
    pools: dict[str, tuple[str, ...]] = {}

    def spec(self) -> SimHostSpec:
        """Returns the spec it describes."""
        return SimHostSpec(
            name=self.name, cpus=self.cpus, memory_mb=self.memory_mb,
            devices=tuple(d.device(tuple(v.address for v in self.devices
                                         if v.physical_function == d.address))
                          for d in self.devices),
            domains=tuple(d.domain() for d in self.domains),
            refuse_detach=frozenset(self.refuse_detach), fail_migration=self.fail_migration,
            persist=self.persist, networks=self.networks, bridges=self.bridges,
            pools=dict(self.pools))


_spec_decoder = msgspec.json.Decoder(_SpecFile, dec_hook=_pci_address)


def spec_from_dict(data: Mapping[str, Any]) -> SimHostSpec:
    """Builds a spec from its JSON form as Python values (see docs/agent.md, "Simulated hosts").

    Raises:
        msgspec.ValidationError: a field is unknown, missing or wrong; the
            text names it (``$.devices[1].address``).
    """
    return msgspec.convert(data, _SpecFile, dec_hook=_pci_address).spec()


def load_spec(path: str | Path) -> SimHostSpec:
    """Reads a simulated-host spec file; a bad file is a ``ConfigError`` naming it and the field."""
    try:
        return _spec_decoder.decode(Path(path).read_bytes()).spec()
    except FileNotFoundError:
        raise ConfigError(str(path), 0, str(path), "the simulated-host spec file does not exist; "
                          "use libvirt.uri=simulated:///<absolute path of a JSON spec>") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(str(path), 0, str(path), f"not a valid simulated-host spec ({exc}); "
                          "see docs/agent.md") from None


def _hex_attrs(address: PciAddress) -> dict[str, str]:
    return {"domain": f"0x{address.domain:04x}", "bus": f"0x{address.bus:02x}",
            "slot": f"0x{address.slot:02x}", "function": f"0x{address.function:x}"}


def build_node_xml(spec: SimHostSpec) -> str:
    """Returns the test-driver ``<node>`` XML for a simulated host."""
    ET.register_namespace("test", _TEST_NS)
    node = ET.Element("node")
    cpu = ET.SubElement(node, "cpu")
    for tag, value in (("mhz", 3000), ("model", "i686"), ("active", spec.cpus), ("nodes", 1),
                       ("sockets", 1), ("cores", spec.cpus), ("threads", 1)):
        ET.SubElement(cpu, tag).text = str(value)
    ET.SubElement(node, "memory").text = str(spec.memory_mb * 1024)
    computer = ET.SubElement(node, "device")
    ET.SubElement(computer, "name").text = "computer"
    system = ET.SubElement(computer, "capability", {"type": "system"})
    hardware = ET.SubElement(system, "hardware")
    for tag, value in (("vendor", "hostdev"), ("version", "simulated"), ("serial", spec.name),
                       ("uuid", str(uuid.uuid5(uuid.NAMESPACE_DNS, spec.name + ".hostdev")))):
        ET.SubElement(hardware, tag).text = value
    groups: dict[int, list[PciAddress]] = {}
    assigned: dict[PciAddress, int] = {}
    next_group = max((d.iommu_group or 0 for d in spec.devices), default=0) + 1
    for device in spec.devices:
        group = device.iommu_group
        if group is None:
            group, next_group = next_group, next_group + 1
        assigned[device.address] = group
        groups.setdefault(group, []).append(device.address)
    for device in spec.devices:
        element = ET.SubElement(node, "device")
        ET.SubElement(element, "name").text = device.address.libvirt_name
        ET.SubElement(element, "parent").text = (
            device.parent.libvirt_name if device.parent else "computer")
        if device.driver:
            ET.SubElement(ET.SubElement(element, "driver"), "name").text = device.driver
        _pci_capability(ET.SubElement(element, "capability", {"type": "pci"}), device,
                        assigned[device.address], groups[assigned[device.address]])
    _resources(node, spec)
    for domain in spec.domains:
        node.append(_domain_element(domain))
    return ET.tostring(node, encoding="unicode")


def _resources(node: ET.Element, spec: SimHostSpec) -> None:
    """Adds the spec's networks, bridges and storage pools (directories nobody writes)."""
    for name in spec.networks:
        network = ET.SubElement(node, "network")
        ET.SubElement(network, "name").text = name
        ET.SubElement(network, "bridge", {"name": f"virbr-{name}"[:15]})
    for name in spec.bridges:
        bridge = ET.SubElement(node, "interface", {"type": "bridge", "name": name})
        ET.SubElement(bridge, "start", {"mode": "onboot"})
        ET.SubElement(bridge, "bridge")
    for name, volumes in spec.pools.items():
        pool = ET.SubElement(node, "pool", {"type": "dir"})
        ET.SubElement(pool, "name").text = name
        ET.SubElement(ET.SubElement(pool, "target"), "path").text = f"/simulated/{spec.name}/{name}"
        for volume in volumes:
            pool.append(volume_element(volume))


def volume_element(name: str) -> ET.Element:
    """Returns a simulated base image: a 1 GiB qcow2 volume."""
    volume = ET.Element("volume", {"type": "file"})
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", {"unit": "GiB"}).text = "1"
    ET.SubElement(ET.SubElement(volume, "target"), "format", {"type": "qcow2"})
    return volume


def _pci_capability(cap: ET.Element, device: NodePciDevice, group: int,
                    members: list[PciAddress]) -> None:
    """Fills a ``<capability type='pci'>`` in the order of libvirt's node device schema."""
    ET.SubElement(cap, "class").text = f"0x{device.class_code:06x}"
    for tag in ("domain", "bus", "slot", "function"):
        ET.SubElement(cap, tag).text = str(getattr(device.address, tag))
    ET.SubElement(cap, "product", {"id": device.product_id}).text = device.product
    ET.SubElement(cap, "vendor", {"id": device.vendor_id}).text = device.vendor
    if device.physical_function is not None:
        pf = ET.SubElement(cap, "capability", {"type": "phys_function"})
        ET.SubElement(pf, "address", _hex_attrs(device.physical_function))
    if device.virtual_functions:
        vfs = ET.SubElement(cap, "capability", {
            "type": "virt_functions", "maxCount": str(len(device.virtual_functions))})
        for vf in device.virtual_functions:
            ET.SubElement(vfs, "address", _hex_attrs(vf))
    group_element = ET.SubElement(cap, "iommuGroup", {"number": str(group)})
    for member in members:
        ET.SubElement(group_element, "address", _hex_attrs(member))
    if device.numa_node is not None:
        ET.SubElement(cap, "numa", {"node": str(device.numa_node)})


def _domain_element(domain: SimDomain) -> ET.Element:
    element = ET.Element("domain", {"type": "test"})
    ET.SubElement(element, "name").text = domain.name
    ET.SubElement(element, "uuid").text = domain.uuid
    ET.SubElement(element, "memory", {"unit": "MiB"}).text = str(domain.memory_mb)
    ET.SubElement(element, "vcpu").text = str(domain.cpus)
    ET.SubElement(ET.SubElement(element, "os"), "type").text = "hvm"
    devices = ET.SubElement(element, "devices")
    for address in domain.hostdevs:
        devices.append(hostdev_element(address))
    if not domain.running:
        ET.SubElement(element, f"{{{_TEST_NS}}}runstate").text = _RUNSTATE_SHUTOFF
    return element


def _int(text: str | None, base: int = 10) -> int:
    return int(text.strip(), base) if text and text.strip() else 0


def parse_pci_device(xml: str) -> NodePciDevice | None:
    """Parses one node device's XML; None when it is not a PCI device."""
    root = ET.fromstring(xml)
    cap = root.find("./capability[@type='pci']")
    if cap is None:
        return None
    address = PciAddress.from_parts(
        _int(cap.findtext("domain")), _int(cap.findtext("bus")),
        _int(cap.findtext("slot")), _int(cap.findtext("function")))
    vendor = cap.find("vendor")
    product = cap.find("product")
    group = cap.find("iommuGroup")
    parent = (root.findtext("parent") or "").strip()
    numa = cap.find("numa")
    # libvirt writes node -1 when the kernel does not know the device's node.
    numa_node = _int(numa.get("node")) if numa is not None and numa.get("node") else -1
    pf = _addresses(cap.find("./capability[@type='phys_function']"))
    return NodePciDevice(
        address=address,
        vendor_id=vendor.get("id", "") if vendor is not None else "",
        product_id=product.get("id", "") if product is not None else "",
        vendor=(vendor.text or "").strip() if vendor is not None else "",
        product=(product.text or "").strip() if product is not None else "",
        class_code=_int(cap.findtext("class"), 16) if cap.findtext("class") else 0,
        iommu_group=int(group.get("number", "0")) if group is not None else None,
        iommu_members=_addresses(group),
        driver=(root.findtext("./driver/name") or "").strip(),
        parent=PciAddress.from_libvirt_name(parent) if parent.startswith("pci_") else None,
        numa_node=numa_node if numa_node >= 0 else None,
        physical_function=pf[0] if pf else None,
        virtual_functions=_addresses(cap.find("./capability[@type='virt_functions']")),
    )


def _addresses(element: ET.Element | None) -> tuple[PciAddress, ...]:
    """Returns the ``<address domain= bus= slot= function=>`` children of ``element``."""
    if element is None:
        return ()
    return tuple(
        PciAddress.from_parts(*(int(a.get(p, "0"), 0)
                                for p in ("domain", "bus", "slot", "function")))
        for a in element.findall("address"))
