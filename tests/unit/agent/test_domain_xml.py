"""Domain XML: building domains with managed PCI hostdevs and reading them back."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import msgspec

from hostdev.agent.domain_xml import (
    OwnVolume,
    build_domain_xml,
    domain_refusal,
    hostdev_xml,
    pci_backends,
    read_hostdevs,
    read_identity,
    read_own_volumes,
    with_domain_type,
    with_hostdev,
    with_numatune,
    with_own_volumes,
    without_hostdev,
    without_runtime_id,
)
from hostdev.messages.domain_template import BaseImage
from hostdev.messages.pci_address import PciAddress as P
from hostdev.messages.values import VmSpec
from tests.support.agent import NODE_XML

SPEC = VmSpec(uuid="22222222-0000-0000-0000-000000000001", name="vm1", cpus=2, memory_mb=512,
              pci_devices=(P("28:00.1"), P("1:3b:1f.7"), P("0000:28:00.1")))


def test_a_hostdev_is_a_managed_pci_subsystem_device_with_hex_address() -> None:
    """The hostdev element is mode=subsystem type=pci managed=yes with 0x-prefixed parts."""
    element = ET.fromstring(hostdev_xml(P("1:3b:1f.7")))
    assert element.attrib == {"mode": "subsystem", "type": "pci", "managed": "yes"}
    address = element.find("./source/address")
    assert address is not None
    assert address.attrib == {"domain": "0x0001", "bus": "0x3b", "slot": "0x1f",
                              "function": "0x7"}


def test_a_built_domain_carries_identity_size_and_each_device_once() -> None:
    """Name, UUID, memory, vCPUs and the hostdevs (duplicates folded) are in the XML."""
    xml = build_domain_xml(SPEC, domain_type="test")
    root = ET.fromstring(xml)
    assert root.get("type") == "test"
    assert read_identity(xml) == (SPEC.uuid, "vm1")
    assert root.findtext("memory") == "512" and root.find("memory").get("unit") == "MiB"  # type: ignore[union-attr]
    assert root.findtext("vcpu") == "2"
    assert read_hostdevs(xml) == (P("28:00.1"), P("1:3b:1f.7"))


def test_a_numa_node_binds_the_memory_strictly_and_only_when_set() -> None:
    """A spec with a NUMA node gets numatune strict on that node; without, no numatune."""
    bound = ET.fromstring(build_domain_xml(msgspec.structs.replace(SPEC, numa_node=1)))
    assert [m.attrib for m in bound.findall("./numatune/memory")] == [
        {"mode": "strict", "nodeset": "1"}]
    assert ET.fromstring(build_domain_xml(SPEC)).find("numatune") is None


def test_with_numatune_replaces_the_binding_and_keeps_the_rest() -> None:
    """Rebinding a bound domain leaves one numatune, on the new node; hostdevs stay."""
    bound = build_domain_xml(msgspec.structs.replace(SPEC, numa_node=0))
    rebound = ET.fromstring(with_numatune(bound, 3))
    assert [m.get("nodeset") for m in rebound.findall("./numatune/memory")] == ["3"]
    assert read_hostdevs(ET.tostring(rebound, encoding="unicode")) == read_hostdevs(bound)
    unbound = ET.fromstring(with_numatune(build_domain_xml(SPEC), 2))
    assert [m.get("nodeset") for m in unbound.findall("./numatune/memory")] == ["2"]


def test_a_kvm_domain_names_its_architecture() -> None:
    """A kvm domain declares an x86_64 hvm guest."""
    root = ET.fromstring(build_domain_xml(SPEC))
    assert root.get("type") == "kvm"
    assert root.find("./os/type").attrib == {"arch": "x86_64"}  # type: ignore[union-attr]


def test_hostdevs_are_read_from_libvirt_xml() -> None:
    """The reference node file's running domain holds 0000:28:00.0."""
    domain = ET.fromstring(NODE_XML.read_text()).find("domain")
    assert domain is not None
    assert read_hostdevs(ET.tostring(domain, encoding="unicode")) == (P("28:00.0"),)


def test_non_pci_hostdevs_are_ignored() -> None:
    """A USB hostdev is not a PCI device and is not reported."""
    xml = ("<domain><devices><hostdev mode='subsystem' type='usb'><source>"
           "<vendor id='0x1'/></source></hostdev></devices></domain>")
    assert read_hostdevs(xml) == ()


def test_adding_and_removing_a_hostdev_edits_only_that_device() -> None:
    """with_hostdev adds once; without_hostdev removes only the given address."""
    xml = build_domain_xml(SPEC, domain_type="test")
    added = with_hostdev(xml, P("5e:00.0"))
    assert read_hostdevs(added) == (P("28:00.1"), P("1:3b:1f.7"), P("5e:00.0"))
    assert with_hostdev(added, P("5e:00.0")) == added
    assert read_hostdevs(without_hostdev(added, P("28:00.1"))) == (P("1:3b:1f.7"), P("5e:00.0"))
    assert read_hostdevs(with_hostdev("<domain><name>x</name></domain>", P("1:2.3"))) == (
        P("1:2.3"),)


def test_the_runtime_id_is_stripped_for_redefinition() -> None:
    """A running domain's id attribute is removed, the rest kept."""
    stripped = without_runtime_id("<domain type='test' id='4'><name>x</name></domain>")
    assert ET.fromstring(stripped).attrib == {"type": "test"}


def test_pci_backends_are_read_from_domain_capabilities() -> None:
    """vfio is listed when present; an empty pciBackend enum gives ()."""
    with_vfio = ("<domainCapabilities><devices><hostdev supported='yes'>"
                 "<enum name='pciBackend'><value>vfio</value></enum>"
                 "</hostdev></devices></domainCapabilities>")
    assert pci_backends(with_vfio) == ("vfio",)
    without = ("<domainCapabilities><devices><hostdev supported='yes'>"
               "<enum name='pciBackend'/></hostdev></devices></domainCapabilities>")
    assert pci_backends(without) == ()


def test_a_host_without_kvm_runs_a_kvm_template_under_tcg() -> None:
    """kvm becomes qemu on a host without KVM; qemu and kvm stay on a KVM host."""
    kvm = "<domain type='kvm'><devices><emulator>/usr/bin/qemu</emulator></devices></domain>"
    assert ET.fromstring(with_domain_type(kvm, "qemu")).get("type") == "qemu"
    assert with_domain_type(kvm, "kvm") == kvm
    assert with_domain_type(kvm.replace("'kvm'", "'qemu'"), "kvm") == kvm.replace("'kvm'",
                                                                                   "'qemu'")


def test_a_simulated_host_runs_any_template_as_a_test_domain() -> None:
    """The test driver gets type test and no emulator path."""
    kvm = "<domain type='kvm'><devices><emulator>/usr/bin/qemu</emulator></devices></domain>"
    root = ET.fromstring(with_domain_type(kvm, "test"))
    assert root.get("type") == "test" and root.find("./devices/emulator") is None


def test_a_domain_lacking_an_assigned_device_is_refused() -> None:
    """A received domain must pass through every device management assigned."""
    spec = VmSpec(uuid=SPEC.uuid, name="vm1", cpus=1, memory_mb=1, pci_devices=(P("28:00.1"),))
    bare = build_domain_xml(VmSpec(uuid=SPEC.uuid, name="vm1", cpus=1, memory_mb=1))
    assert domain_refusal(bare, spec) == "the domain XML lacks the assigned device(s) " \
        "0000:28:00.1"
    assert domain_refusal(build_domain_xml(spec), spec) is None
    assert domain_refusal("<domain", spec) is not None


def test_own_volumes_are_recorded_and_read_back() -> None:
    """A base-image disk points at the VM's overlay; the metadata records its base."""
    template = ("<domain type='kvm'><devices><disk type='volume' device='disk'>"
                "<source pool='images' volume='base.qcow2'/><target dev='vda'/></disk>"
                "</devices></domain>")
    image = BaseImage(pool="images", volume="base.qcow2", target="vda")
    xml = with_own_volumes(template, "u1", [image])
    assert ET.fromstring(xml).find("./devices/disk/source").get("volume") == "u1-vda.qcow2"  # type: ignore[union-attr]
    assert read_own_volumes(xml) == (OwnVolume(pool="images", volume="u1-vda.qcow2",
                                               base="base.qcow2"),)
    assert read_own_volumes(with_own_volumes(xml, "u1", [image])) == read_own_volumes(xml)
