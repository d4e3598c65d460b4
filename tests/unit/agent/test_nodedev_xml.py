"""Node-device XML: simulated-host specs to test-driver node XML and back."""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hostdev.agent.errors import ConfigError
from hostdev.agent.nodedev_xml import (
    build_node_xml,
    load_spec,
    parse_pci_device,
    spec_from_dict,
)
from hostdev.agent.pci_device import NodePciDevice
from hostdev.messages.pci_address import PciAddress as P
from tests.support.agent import NODE_XML, VM_IDLE_UUID, sample_spec


def devices_of(node_xml: str) -> dict[P, NodePciDevice]:
    root = ET.fromstring(node_xml)
    found: dict[P, NodePciDevice] = {}
    for device in root.findall("device"):
        parsed = parse_pci_device(ET.tostring(device, encoding="unicode"))
        if parsed is not None:
            found[parsed.address] = parsed
    return found


def test_the_reference_node_file_parses_into_devices() -> None:
    """Vendor, product, class, IOMMU group and members come from libvirt's nodedev XML."""
    devices = devices_of(NODE_XML.read_text())
    gpu = devices[P("28:00.0")]
    assert (gpu.vendor_id, gpu.product_id, gpu.iommu_group) == ("0x10de", "0x2204", 27)
    assert gpu.iommu_members == (P("28:00.0"), P("28:00.1"))
    assert gpu.driver == "vfio-pci" and not gpu.is_bridge
    assert devices[P("00:03.1")].is_bridge
    assert devices[P("00:00.0")].is_bridge


def test_the_parent_bridge_comes_from_the_node_tree() -> None:
    """A device behind a bridge names it; one hanging off the computer has no parent."""
    devices = devices_of(NODE_XML.read_text())
    assert devices[P("28:00.0")].parent == P("00:03.1")
    assert devices[P("00:00.0")].parent is None


def test_a_non_pci_node_device_is_not_parsed() -> None:
    """The computer (system capability) device yields None."""
    assert parse_pci_device("<device><name>computer</name>"
                            "<capability type='system'/></device>") is None


def test_a_spec_round_trips_through_node_xml() -> None:
    """Every spec device comes back with its address, ids, class and group members."""
    spec = spec_from_dict(sample_spec())
    devices = devices_of(build_node_xml(spec))
    assert set(devices) == {P("00:03.1"), P("28:00.1"), P("28:00.2"), P("3b:00.0"),
                            P("3b:00.1")}
    nic = devices[P("28:00.1")]
    assert (nic.vendor_id, nic.product_id, nic.class_code, nic.iommu_group) == (
        "0x8086", "0x1572", 0x020000, 27)
    assert nic.iommu_members == (P("00:03.1"), P("28:00.1"), P("28:00.2"))
    assert devices[P("3b:00.0")].iommu_members == (P("3b:00.0"), P("3b:00.1"))
    assert {a: d.parent for a, d in devices.items()} == {
        d.address: d.parent for d in spec.devices}


def test_devices_without_a_group_get_one_each() -> None:
    """A device with no iommu_group is alone in a fresh group."""
    spec = spec_from_dict({"devices": [{"address": "1:0.0", "iommu_group": 3},
                                       {"address": "2:0.0"}, {"address": "3:0.0"}]})
    devices = devices_of(build_node_xml(spec))
    groups = {a: d.iommu_group for a, d in devices.items()}
    assert groups == {P("1:0.0"): 3, P("2:0.0"): 4, P("3:0.0"): 5}


def test_spec_domains_become_test_domains_with_their_run_state() -> None:
    """A spec domain that is not running gets the test driver's shut-off run state."""
    root = ET.fromstring(build_node_xml(spec_from_dict(sample_spec())))
    domains = {d.findtext("uuid"): d for d in root.findall("domain")}
    runstate = "{http://libvirt.org/schemas/domain/test/1.0}runstate"
    assert domains[VM_IDLE_UUID].findtext(runstate) == "5"
    assert all(d.get("type") == "test" for d in domains.values())


def test_spec_failure_switches_are_read() -> None:
    """refuse_detach and fail_migration are part of the spec."""
    spec = spec_from_dict(sample_spec(refuse_detach=["28:00.2"], fail_migration="boom"))
    assert spec.refuse_detach == {P("28:00.2")}
    assert spec.fail_migration == "boom"


def test_a_missing_or_broken_spec_file_is_a_config_error(tmp_path: Path) -> None:
    """The spec loader names the file and what is wrong."""
    with pytest.raises(ConfigError, match="spec file does not exist"):
        load_spec(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"devices": [{"address": "28:00.9"}]}))
    with pytest.raises(ConfigError, match="not a valid simulated-host spec") as refused:
        load_spec(bad)
    assert str(bad) in str(refused.value) and "$.devices[0].address" in str(refused.value)


@pytest.mark.parametrize(("spec", "named"), [
    ({"devices": [{"address": "28:00.1", "iommu_grup": 3}]}, "unknown field `iommu_grup`"),
    ({"devices": [{"address": "28:00.1", "class": "nic"}]}, "class 'nic' is not a number"),
    ({"cpus": "4"}, "$.cpus"),
    ({"domains": [{"name": "vm"}]}, "missing required field `uuid` - at `$.domains[0]`"),
    ({"refuse_detach": [7]}, "$.refuse_detach[0]"),
])
def test_a_wrong_spec_field_is_named(tmp_path: Path, spec: dict[str, object],
                                     named: str) -> None:
    """A misspelt, missing or mistyped field is a ConfigError naming the file and the field."""
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ConfigError) as refused:
        load_spec(path)
    assert str(path) in str(refused.value) and named in str(refused.value)


SRIOV_PF_XML = """
<device>
  <name>pci_0000_3b_00_0</name>
  <parent>pci_0000_00_03_1</parent>
  <driver><name>mlx5_core</name></driver>
  <capability type='pci'>
    <class>0x020000</class>
    <domain>0</domain><bus>59</bus><slot>0</slot><function>0</function>
    <product id='0x101d'>MT2892 Family [ConnectX-6 Dx]</product>
    <vendor id='0x15b3'>Mellanox Technologies</vendor>
    <capability type='virt_functions' maxCount='8'>
      <address domain='0x0000' bus='0x3b' slot='0x00' function='0x2'/>
      <address domain='0x0000' bus='0x3b' slot='0x00' function='0x3'/>
    </capability>
    <iommuGroup number='52'>
      <address domain='0x0000' bus='0x3b' slot='0x00' function='0x0'/>
    </iommuGroup>
    <numa node='1'/>
  </capability>
</device>
"""

SRIOV_VF_XML = """
<device>
  <name>pci_0000_3b_00_2</name>
  <parent>pci_0000_00_03_1</parent>
  <driver><name>vfio-pci</name></driver>
  <capability type='pci'>
    <class>0x020000</class>
    <domain>0</domain><bus>59</bus><slot>0</slot><function>2</function>
    <product id='0x101e'>ConnectX Family mlx5Gen Virtual Function</product>
    <vendor id='0x15b3'>Mellanox Technologies</vendor>
    <capability type='phys_function'>
      <address domain='0x0000' bus='0x3b' slot='0x00' function='0x0'/>
    </capability>
    <iommuGroup number='54'>
      <address domain='0x0000' bus='0x3b' slot='0x00' function='0x2'/>
    </iommuGroup>
    <numa node='1'/>
  </capability>
</device>
"""


def test_the_numa_node_is_parsed() -> None:
    """``<numa node='1'/>`` gives the device's NUMA node."""
    device = parse_pci_device(SRIOV_PF_XML)
    assert device is not None and device.numa_node == 1


def test_an_unknown_or_missing_numa_node_is_none() -> None:
    """libvirt writes node -1 when the kernel does not know; no element says nothing either."""
    unknown = parse_pci_device(SRIOV_PF_XML.replace("node='1'", "node='-1'"))
    assert unknown is not None and unknown.numa_node is None
    gpu = devices_of(NODE_XML.read_text())[P("28:00.0")]
    assert gpu.numa_node is None


def test_the_virtual_functions_of_a_physical_function_are_parsed() -> None:
    """``<capability type='virt_functions'>`` lists a PF's VFs; a PF has no PF of its own."""
    device = parse_pci_device(SRIOV_PF_XML)
    assert device is not None
    assert device.virtual_functions == (P("3b:00.2"), P("3b:00.3"))
    assert device.physical_function is None


def test_the_physical_function_of_a_virtual_function_is_parsed() -> None:
    """``<capability type='phys_function'>`` names a VF's PF; a VF has no VFs."""
    device = parse_pci_device(SRIOV_VF_XML)
    assert device is not None
    assert device.physical_function == P("3b:00.0")
    assert device.virtual_functions == ()


def test_class_vendor_product_and_driver_are_parsed() -> None:
    """Class, vendor and product names and the host driver come from the node XML."""
    device = parse_pci_device(SRIOV_PF_XML)
    assert device is not None
    assert (device.class_code, device.vendor, device.product, device.driver) == (
        0x020000, "Mellanox Technologies", "MT2892 Family [ConnectX-6 Dx]", "mlx5_core")


def test_the_iommu_group_members_are_parsed() -> None:
    """Every ``<address>`` of ``<iommuGroup>`` is a member, this device included."""
    device = parse_pci_device(SRIOV_VF_XML)
    assert device is not None
    assert (device.iommu_group, device.iommu_members) == (54, (P("3b:00.2"),))


def sriov_spec() -> dict[str, object]:
    """A PF on NUMA node 1 with two VFs, one VF in the PF's group."""
    return {"devices": [
        {"address": "5e:00.0", "iommu_group": 60, "numa_node": 1, "driver": "i40e"},
        {"address": "5e:02.0", "iommu_group": 61, "numa_node": 1, "driver": "vfio-pci",
         "physical_function": "5e:00.0", "product_id": "0x154c"},
        {"address": "5e:02.1", "iommu_group": 60, "numa_node": 1,
         "physical_function": "5e:00.0", "product_id": "0x154c"},
    ]}


def test_a_spec_expresses_numa_sriov_and_driver_through_node_xml() -> None:
    """NUMA node, PF/VF relation, driver and group members survive the spec's node XML."""
    devices = devices_of(build_node_xml(spec_from_dict(sriov_spec())))
    pf, vf0, vf1 = devices[P("5e:00.0")], devices[P("5e:02.0")], devices[P("5e:02.1")]
    assert pf.virtual_functions == (P("5e:02.0"), P("5e:02.1"))
    assert pf.physical_function is None
    assert (vf0.physical_function, vf1.physical_function) == (P("5e:00.0"), P("5e:00.0"))
    assert {d.numa_node for d in devices.values()} == {1}
    assert (pf.driver, vf0.driver, vf1.driver) == ("i40e", "vfio-pci", "")
    assert pf.iommu_members == (P("5e:00.0"), P("5e:02.1"))


def test_the_spec_device_equals_the_parsed_device() -> None:
    """What the spec says of a device is exactly what the node XML gives back."""
    spec = spec_from_dict(sriov_spec())
    parsed = devices_of(build_node_xml(spec))
    for device in spec.devices:
        got = parsed[device.address]
        assert got == dataclasses.replace(device, iommu_members=got.iommu_members)
