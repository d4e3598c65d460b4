"""The agent's PCI device type and what it reports to management."""

from __future__ import annotations

from hostdev.agent.pci_device import NodePciDevice
from hostdev.messages.pci_address import PciAddress as P
from hostdev.messages.values import PciDeviceInfo


def test_a_device_reports_its_listed_name_and_every_fact() -> None:
    """The report carries the pci.devices name with every fact libvirt gives of the device."""
    device = NodePciDevice(address=P("28:02.0"), vendor_id="0x8086", product_id="0x154c",
                           vendor="Intel", product="X710 VF", class_code=0x020000,
                           iommu_group=27, iommu_members=(P("28:00.1"), P("28:02.0")),
                           driver="vfio-pci", numa_node=1, physical_function=P("28:00.0"))
    assert device.report("10GE") == PciDeviceInfo(
        address=P("28:02.0"), name="10GE", vendor_id="0x8086", product_id="0x154c",
        iommu_group=27, vendor="Intel", product="X710 VF", class_code=0x020000, numa_node=1,
        iommu_members=(P("28:00.1"), P("28:02.0")), physical_function=P("28:00.0"),
        driver="vfio-pci")


def test_a_physical_function_reports_its_virtual_functions() -> None:
    """A PF's report lists its VFs and names no PF."""
    device = NodePciDevice(address=P("28:00.0"), virtual_functions=(P("28:02.0"), P("28:02.1")))
    report = device.report("pf")
    assert (report.virtual_functions, report.physical_function) == (
        (P("28:02.0"), P("28:02.1")), None)


def test_only_base_class_six_is_a_bridge() -> None:
    """Host and PCI bridges (class 0x06xxxx) are bridges; a NIC is not."""
    assert NodePciDevice(address=P("00:03.1"), class_code=0x060400).is_bridge
    assert not NodePciDevice(address=P("28:00.1"), class_code=0x020000).is_bridge
