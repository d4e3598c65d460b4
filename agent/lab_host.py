"""``LabHost``: real libvirt with emulated stand-ins for the passthrough devices (lab only).

What ``lab.emulated.devices=yes`` in ``agent.properties`` runs instead of
``LibvirtHost``: every libvirt call is the real one, on the real daemon, but
the devices it plugs are the emulated stand-ins of ``hostdev.agent.lab_devices``
rather than ``<hostdev>``s, so the whole path can be proven on a host without
an IOMMU. Never for production: no device of the host is passed through.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from hostdev.agent.lab_devices import StandIns, read_devices
from hostdev.agent.libvirt_host import LibvirtHost
from hostdev.agent.pci_device import NodePciDevice
from hostdev.messages.pci_address import PciAddress

log = structlog.get_logger()


class LabHost(LibvirtHost):
    """A ``LibvirtHost`` whose passthrough devices are emulated stand-ins."""

    def __init__(self, uri: str, addresses: Iterable[PciAddress]) -> None:
        """Prepares the host at ``uri`` with a stand-in for each of ``addresses``.

        Raises ``ValueError`` when there are more than the guest has slots for
        (``load_config`` refuses such a configuration first).
        """
        super().__init__(uri)
        self.stand_ins = StandIns.for_addresses(addresses)

    def open(self) -> None:
        """Connects, saying loudly that this host passes nothing through."""
        super().open()
        log.warning("lab_emulated_devices", uri=self.uri, devices=len(self.stand_ins.addresses),
                    hint="lab only: guests get emulated stand-ins; no device of this host is "
                    "passed through")

    def device_xml(self, address: PciAddress) -> str:
        """Returns the stand-in's ``<interface>`` for ``address``."""
        return self.stand_ins.device_xml(address)

    def read_devices(self, xml: str) -> tuple[PciAddress, ...]:
        """Returns the addresses a domain holds, stand-ins included."""
        return read_devices(xml)

    def define(self, xml: str) -> None:
        """Defines the domain with each assigned ``<hostdev>`` replaced by its stand-in."""
        super().define(self.stand_ins.domain_with_stand_ins(xml))

    def pci_devices(self) -> tuple[NodePciDevice, ...]:
        """Returns the stand-ins as the host's PCI devices (the real ones are not offered)."""
        return self.stand_ins.node_devices()

    def pci_backends(self) -> tuple[str, ...] | None:
        """The stand-ins need no passthrough backend: unknown, so nothing is warned."""
        return None
