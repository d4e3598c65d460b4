"""``NodePciDevice``: the agent's one type for a PCI device of the host, and what it reports.

libvirt describes each device as a node device (``nodeDevice.XMLDesc()``);
a simulated host's spec lists the same facts, which its generated node XML
then gives back. A device the operator set aside (a ``pci.devices`` entry,
``hostdev.agent.config.PciDeviceEntry``) is reported to management as a
``PciDeviceInfo``; ``NodePciDevice.report`` is the one place that mapping is
made.
"""

from __future__ import annotations

from dataclasses import dataclass

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import PciDeviceInfo


@dataclass(frozen=True)
class NodePciDevice:
    """One PCI device of the host, as libvirt describes it.

    Attributes:
        address: the device's PCI address.
        vendor_id: the vendor id, ``0x10de``.
        product_id: the product id, ``0x2204``.
        vendor: the vendor's name.
        product: the product's name.
        class_code: the 24-bit PCI class (``0x020000`` an Ethernet controller).
        iommu_group: the IOMMU group number, None when the host has no IOMMU.
        iommu_members: every device of that group, this one included.
        driver: the kernel driver bound to it (``vfio-pci``), "" when none.
        parent: the bridge it sits behind, None when it hangs off the root.
        numa_node: the NUMA node it is attached to, None when the host does not say.
        physical_function: for an SR-IOV virtual function, its physical function.
        virtual_functions: for an SR-IOV physical function, its virtual functions.
    """

    address: PciAddress
    vendor_id: str = ""
    product_id: str = ""
    vendor: str = ""
    product: str = ""
    class_code: int = 0
    iommu_group: int | None = None
    iommu_members: tuple[PciAddress, ...] = ()
    driver: str = ""
    parent: PciAddress | None = None
    numa_node: int | None = None
    physical_function: PciAddress | None = None
    virtual_functions: tuple[PciAddress, ...] = ()

    @property
    def is_bridge(self) -> bool:
        """True for host and PCI bridges (base class 0x06), which share groups harmlessly."""
        return self.class_code >> 16 == 0x06

    def report(self, name: str, withheld: str = "") -> PciDeviceInfo:
        """Returns what the agent tells management of this device, listed under ``name``.

        ``withheld`` says why the agent keeps it from offer ("" when it does not).
        """
        return PciDeviceInfo(
            address=self.address, name=name, vendor_id=self.vendor_id,
            product_id=self.product_id, iommu_group=self.iommu_group, vendor=self.vendor,
            product=self.product, class_code=self.class_code, numa_node=self.numa_node,
            iommu_members=self.iommu_members, physical_function=self.physical_function,
            virtual_functions=self.virtual_functions, driver=self.driver,
            withheld=withheld)
