"""Start-up checks of the listed devices against the host's node devices and domains."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from hostdev.agent.config import parse_config
from hostdev.agent.errors import ConfigError
from hostdev.agent.nodedev_xml import (
    build_node_xml,
    parse_pci_device,
    spec_from_dict,
)
from hostdev.agent.pci_device import NodePciDevice
from hostdev.agent.startup_checks import check_host
from hostdev.messages.pci_address import PciAddress as P
from hostdev.messages.values import DomainInfo
from tests.support.agent import SAMPLE_DEVICES, VM_OLD_UUID, sample_spec


def host_devices() -> list[NodePciDevice]:
    root = ET.fromstring(build_node_xml(spec_from_dict(sample_spec())))
    parsed = (parse_pci_device(ET.tostring(d, encoding="unicode")) for d in root.iter("device"))
    return [d for d in parsed if d is not None]


OLD = DomainInfo(uuid=VM_OLD_UUID, name="vm-old", state="running", hostdevs=(P("3b:00.0"),))


def test_listed_devices_become_the_inventory_with_ids_and_groups() -> None:
    """Each listed device present on the host is reported with vendor, product and group."""
    config = parse_config(f"pci.devices={SAMPLE_DEVICES}\n", "a.properties")
    report = check_host(config, host_devices(), [])
    assert report.ok
    assert [(d.address, d.name, d.vendor_id, d.product_id, d.iommu_group)
            for d in report.inventory] == [
        (P("28:00.1"), "10GE", "0x8086", "0x1572", 27),
        (P("28:00.2"), "10GE", "0x8086", "0x1572", 27),
        (P("3b:00.0"), "GPU", "0x10de", "0x2204", 40)]


def test_a_listed_device_missing_on_the_host_is_an_error_naming_it() -> None:
    """An address libvirt does not know fails the check with file, line and node name."""
    config = parse_config("\npci.devices=28:00.1|10GE,5e:00.0|NVME\n", "a.properties")
    report = check_host(config, host_devices(), [])
    assert not report.ok
    assert len(report.errors) == 1
    assert report.errors[0].startswith("a.properties:2: pci.devices lists 0000:5e:00.0 (NVME)")
    assert "pci_0000_5e_00_0 not found" in report.errors[0]


def test_a_partial_group_is_withheld_but_bridges_and_listed_members_are_not() -> None:
    """The GPU's unlisted audio function withholds the GPU; the NICs' bridge and sibling don't."""
    config = parse_config(f"pci.devices={SAMPLE_DEVICES}\n", "a.properties")
    report = check_host(config, host_devices(), [])
    assert report.ok and not report.passes  # the agent starts; --check fails
    assert report.warnings == ()
    reason = ("IOMMU group 40 also holds 0000:3b:00.1, not in pci.devices; list it or set "
              "pci.iommu.partial.groups=allow")
    assert {d.name: d.withheld for d in report.inventory} == {"10GE": "", "GPU": reason}
    assert report.partial_groups == (
        f"a.properties:1: 0000:3b:00.0 (GPU) is withheld from offer: {reason}",)


def test_allowed_partial_groups_are_offered_with_a_warning() -> None:
    """With pci.iommu.partial.groups=allow, nothing is withheld and a warning names the member."""
    config = parse_config("pci.devices=28:00.1|10GE\npci.iommu.partial.groups=allow\n",
                          "a.properties")
    report = check_host(config, host_devices(), [])
    assert report.passes and [d.withheld for d in report.inventory] == [""]
    (warning,) = report.warnings
    assert "shares IOMMU group 27 with 0000:28:00.2" in warning
    assert "00:03.1" not in warning


def test_every_listed_member_of_a_partial_group_is_withheld_once_named() -> None:
    """Two listed functions of a group with a foreign member are both withheld, one error."""
    spec = sample_spec()
    spec["devices"].append({"address": "28:00.3", "iommu_group": 27})
    root = ET.fromstring(build_node_xml(spec_from_dict(spec)))
    devices = [d for d in (parse_pci_device(ET.tostring(e, encoding="unicode"))
                           for e in root.iter("device")) if d is not None]
    config = parse_config("pci.devices=28:00.1|10GE,28:00.2|10GE\n", "a.properties")
    report = check_host(config, devices, [])
    assert [bool(d.withheld) for d in report.inventory] == [True, True]
    assert len(report.partial_groups) == 1 and "0000:28:00.3" in report.partial_groups[0]


def test_a_bad_partial_groups_value_is_an_error_naming_file_and_line() -> None:
    """pci.iommu.partial.groups takes refuse or allow; anything else names file and line."""
    with pytest.raises(ConfigError, match=r"a.properties:2: .*pci.iommu.partial.groups must be "
                                          r"one of refuse, allow"):
        parse_config("pci.devices=28:00.1|10GE\npci.iommu.partial.groups=maybe\n",
                     "a.properties")


def test_a_device_used_by_a_domain_is_reported_with_the_domain() -> None:
    """A listed device in a domain's XML is reported with that domain (not an error)."""
    config = parse_config(f"pci.devices={SAMPLE_DEVICES}\n", "a.properties")
    stopped = DomainInfo(uuid="x", name="vm-x", state="stopped", hostdevs=(P("3b:00.0"),))
    report = check_host(config, host_devices(), [stopped, OLD])
    assert report.ok
    (use,) = report.in_use
    assert (use.address, use.domain.name) == (P("3b:00.0"), "vm-old")
    assert str(use) == (f"0000:3b:00.0 (GPU) is used by domain vm-old ({VM_OLD_UUID}, "
                        "running)")


def test_a_host_without_a_passthrough_backend_is_warned_about() -> None:
    """An empty pciBackend warns that VMs with devices cannot start; unknown says nothing."""
    config = parse_config("pci.devices=28:00.1|10GE,28:00.2|10GE\n", "a.properties")
    assert check_host(config, host_devices(), [], None).warnings == ()
    assert check_host(config, host_devices(), [], ("vfio",)).warnings == ()
    (warning,) = check_host(config, host_devices(), [], ()).warnings
    assert "no PCI passthrough backend" in warning and "vfio-pci" in warning
