"""The ``Hypervisor`` seam: everything the agent asks of libvirt, over plain values.

Two implementations: ``LibvirtHost`` (real libvirt) and ``SimulatedHost``
(libvirt's test driver plus simulated hot-plug and migration). Handlers and
the daemon only see this protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hostdev.agent.pci_device import NodePciDevice
from hostdev.messages.base import PowerState
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DomainInfo


@dataclass(frozen=True)
class HostFacts:
    """What the host is: for ``StartupRoutingCommand``."""

    hostname: str
    cpus: int
    memory_mb: int
    hypervisor: str
    hypervisor_version: str


@dataclass(frozen=True)
class LifecycleEvent:
    """A libvirt domain lifecycle event (``Started``/``Booted``, ``Stopped``/``Shutdown``...)."""

    uuid: str
    name: str
    event: str
    detail: str
    state: PowerState


LifecycleListener = Callable[[LifecycleEvent], None]


class Hypervisor(Protocol):
    """A host's hypervisor as the agent uses it.

    Every method MUST be safe to call again with the same arguments (handlers
    are re-run on redelivery): the caller checks the state first, but an
    implementation never leaves a half-done operation behind silently.
    Failures raise ``HypervisorError`` subclasses, never libvirt's own errors.
    Lifecycle listeners are called on the hypervisor's event thread, not the
    caller's.
    """

    uri: str

    def open(self) -> None:
        """Connects to the hypervisor and starts delivering lifecycle events."""

    def close(self) -> None:
        """Disconnects; idempotent."""

    def facts(self) -> HostFacts:
        """Returns host name, CPUs, memory and hypervisor version."""
        ...

    def pci_devices(self) -> tuple[NodePciDevice, ...]:
        """Returns every PCI node device of the host."""
        ...

    def domains(self) -> tuple[DomainInfo, ...]:
        """Returns every defined or running domain with its power state and hostdevs."""
        ...

    def domain(self, uuid: str) -> DomainInfo | None:
        """Returns one domain, or None when no domain has that UUID."""
        ...

    def domain_xml(self, uuid: str, *, inactive: bool = False) -> str:
        """Returns a domain's live (or, with ``inactive``, persistent) XML."""
        ...

    def define(self, xml: str) -> None:
        """Defines (or redefines, when shut off) a domain, of the type this host runs."""

    def start(self, uuid: str) -> None:
        """Starts a defined domain; a running domain is left alone."""

    def shutdown(self, uuid: str, timeout_s: float) -> PowerState:
        """Asks the guest to power off and waits up to ``timeout_s``; returns the state after."""
        ...

    def destroy(self, uuid: str) -> None:
        """Powers a domain off at once; a stopped domain is left alone."""

    def undefine(self, uuid: str) -> None:
        """Removes a stopped domain's definition; an absent domain is left alone."""

    def attach_hostdev(self, uuid: str, address: PciAddress, timeout_s: float) -> None:
        """Attaches a PCI device live (when running) and in the persistent config."""

    def detach_hostdev(self, uuid: str, address: PciAddress, timeout_s: float) -> None:
        """Detaches a PCI device, waiting up to ``timeout_s`` for the guest to release it.

        Raises ``DetachRefused`` when the guest keeps it; the device then
        MUST still be attached, live and in the config.
        """

    def reset_pci_device(self, address: PciAddress) -> None:
        """Resets a host PCI device (libvirt's node device reset) so no guest state is left.

        Raises ``HypervisorError`` when the host cannot reset it (no FLR nor a
        resettable slot or bus; a driver without reset support says so).
        """

    def migrate(self, uuid: str, destination_uri: str, timeout_s: float, *,
                copy_storage: bool = False, numa_node: int | None = None) -> None:
        """Live-migrates a running domain; raises ``MigrationFailed`` leaving it on the source.

        With ``copy_storage`` the VM's own volumes are copied to the
        destination's volumes of the same names (``prepare_volume_at``). With
        ``numa_node`` the domain's memory is bound to that node on the
        destination (``<numatune>`` of the destination's definition).
        """

    def has_domain_at(self, destination_uri: str, uuid: str) -> bool:
        """Tells whether the host at ``destination_uri`` has the domain (a finished migration)."""
        ...

    def networks(self) -> tuple[str, ...]:
        """Returns the names of the host's active libvirt networks."""
        ...

    def bridges(self) -> tuple[str, ...]:
        """Returns the names of the host's active network interfaces (bridges among them)."""
        ...

    def volumes(self, pool: str) -> tuple[str, ...] | None:
        """Returns the volumes of a storage pool; None when there is no such pool."""
        ...

    def create_volume(self, pool: str, name: str, base: str) -> None:
        """Creates a VM's own volume: a copy-on-write overlay of volume ``base``."""

    def delete_volume(self, pool: str, name: str) -> None:
        """Deletes a volume; an absent one is left alone."""

    def prepare_volume_at(self, destination_uri: str, pool: str, name: str,
                          base: str) -> None:
        """Checks the destination has ``base`` and gives it the overlay ``name`` to copy into.

        Raises ``HypervisorError`` saying what the destination lacks.
        """

    def pci_backends(self) -> tuple[str, ...] | None:
        """Returns the PCI passthrough backends (``vfio``), () when none, None when unknown."""
        ...

    def set_lifecycle_listener(self, listener: LifecycleListener | None) -> None:
        """Sets the callback for lifecycle events (called on the event thread)."""
