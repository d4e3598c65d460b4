"""The agent's PCI device type and what it reports to management."""

from __future__ import annotations

from hostdev.agent.pci_device import NodePciDevice
from hostdev.messages.pci_address import PciAddress as P
from hostdev.messages.values import PciDeviceInfo


def test_a_device_reports_its_listed_name_ids_and_group() -> None:
    """The report carries the pci.devices name with libvirt's ids and IOMMU group."""
    device = NodePciDevice(address=P("28:00.1"), vendor_id="0x8086", product_id="0x1572",
                           vendor="Intel", product="X710", class_code=0x020000,
                           iommu_group=27, iommu_members=(P("28:00.1"),), driver="vfio-pci")
    assert device.report("10GE") == PciDeviceInfo(
        address=P("28:00.1"), name="10GE", vendor_id="0x8086", product_id="0x1572",
        iommu_group=27)


def test_only_base_class_six_is_a_bridge() -> None:
    """Host and PCI bridges (class 0x06xxxx) are bridges; a NIC is not."""
    assert NodePciDevice(address=P("00:03.1"), class_code=0x060400).is_bridge
    assert not NodePciDevice(address=P("28:00.1"), class_code=0x020000).is_bridge
