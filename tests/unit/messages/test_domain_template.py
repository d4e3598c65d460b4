"""Domain templates: management's elements filled in one place, a domain's needs read back."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hostdev.messages.domain_template import (
    DEFAULT_CONSOLE_DIR,
    BaseImage,
    DomainNeeds,
    console_path_for,
    read_needs,
    render_domain,
)
from hostdev.messages.pci_address import PciAddress as P
from hostdev.messages.values import VmSpec
from tests.support.agent import example_template

BOND = example_template("debian-bond.xml")
KERNEL = example_template("kernel-boot.xml")
UUID = "44444444-0000-0000-0000-000000000001"
SPEC = VmSpec(uuid=UUID, name="web1", cpus=4, memory_mb=2048,
              pci_devices=(P("28:00.1"), P("28:00.2"), P("28:00.1")))


def test_rendering_fills_identity_size_and_each_assigned_device_once() -> None:
    """Name, uuid, memory in MiB, vCPUs and the hostdevs (folded) come from the spec."""
    root = ET.fromstring(render_domain(BOND, SPEC))
    assert [root.findtext(t) for t in ("name", "uuid", "memory", "vcpu")] == [
        "web1", UUID, "2048", "4"]
    assert root.find("memory").get("unit") == "MiB"  # type: ignore[union-attr]
    buses = [(a.get("bus"), a.get("function"))
             for a in root.findall("./devices/hostdev[@type='pci']/source/address")]
    assert buses == [("0x28", "0x1"), ("0x28", "0x2")]


def test_rendering_keeps_what_the_template_owns() -> None:
    """Disks, NICs, boot and features of the template are in the rendered domain."""
    root = ET.fromstring(render_domain(BOND, SPEC))
    assert root.get("type") == "kvm"
    assert root.find("./devices/disk/source").get("volume") == "debian-12.qcow2"  # type: ignore[union-attr]
    assert [i.get("type") for i in root.findall("./devices/interface")] == ["network", "bridge"]
    assert root.find("./os/boot").get("dev") == "hd"  # type: ignore[union-attr]
    assert root.find("./features/acpi") is not None


def test_rendering_overwrites_identity_a_template_carries() -> None:
    """A domain that names itself is renamed: management's values win."""
    template = "<domain type='kvm'><name>other</name><memory unit='KiB'>1</memory></domain>"
    root = ET.fromstring(render_domain(template, SPEC))
    assert root.findtext("name") == "web1" and len(root.findall("name")) == 1
    assert root.find("memory").attrib == {"unit": "MiB"}  # type: ignore[union-attr]


def test_every_file_console_is_written_to_the_vm_s_file() -> None:
    """Serial and console of type file both get the console path."""
    path = console_path_for(BOND, UUID)
    root = ET.fromstring(render_domain(BOND, SPEC, console_path=path))
    sources = [s.get("path") for s in root.findall("./devices/*[@type='file']/source")]
    assert sources == [path, path]


def test_the_console_file_is_named_after_the_vm_in_the_template_s_directory() -> None:
    """The directory of the template's path is kept; without one the default is used."""
    assert console_path_for(BOND, UUID) == f"/var/log/hostdev/console/{UUID}.console.log"
    assert console_path_for(KERNEL, UUID) == f"{DEFAULT_CONSOLE_DIR}/{UUID}.console.log"
    assert console_path_for("<domain type='kvm'><devices/></domain>", UUID) == ""


def test_needs_list_networks_bridges_and_base_images() -> None:
    """A template's networks, bridges, volume disks and storage setting are read."""
    assert read_needs(BOND) == DomainNeeds(
        networks=("default",), bridges=("br0",),
        base_images=(BaseImage(pool="images", volume="debian-12.qcow2", target="vda"),),
        shared_storage=False)
    assert read_needs(KERNEL) == DomainNeeds(networks=("default",))


def test_shared_storage_is_read_from_the_metadata() -> None:
    """``<hostdev:storage shared='yes'/>`` makes migration copy nothing."""
    shared = BOND.replace('shared="no"', 'shared="yes"')
    assert read_needs(shared).shared_storage is True


def test_a_vm_s_own_volume_is_named_after_its_uuid_and_disk() -> None:
    """The copy-on-write volume of disk vda is ``<uuid>-vda.qcow2``."""
    image = BaseImage(pool="images", volume="debian-12.qcow2", target="vda")
    assert image.own_volume(UUID) == f"{UUID}-vda.qcow2"
