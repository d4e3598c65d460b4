"""``SimulatedHost``: a host on libvirt's ``test:///`` driver with hot-plug and migration.

The test driver defines, starts and stops domains and lists node devices, but
has no attach, detach or migration. This module adds them:

- attach/detach rewrite the persistent definition and, for a running domain,
  restart it quietly (the restart's lifecycle events are swallowed), so the
  live XML shows the change exactly as a real hot-plug would;
- migration moves the domain between simulated hosts of the same process
  (a registry keyed by URI): defined and started on the destination,
  destroyed and undefined on the source;
- failures on demand: a device whose detach the guest refuses (like a guest
  without ``acpiphp``: the device stays, the detach times out) and a
  migration that fails.

URIs: ``simulated:///<abs path>/spec.json`` builds the node XML from a JSON
spec (see ``nodedev_xml``); ``test:///<abs path>/node.xml`` uses a node file as is.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import structlog

from hostdev.agent.domain_xml import (
    read_hostdevs,
    read_identity,
    with_hostdev,
    without_hostdev,
    without_runtime_id,
)
from hostdev.agent.errors import DetachRefused, MigrationFailed
from hostdev.agent.hypervisor import LifecycleEvent
from hostdev.agent.libvirt_host import LibvirtHost
from hostdev.agent.nodedev_xml import SimHostSpec, build_node_xml, load_spec
from hostdev.messages.pci_address import PciAddress

log = structlog.get_logger()

SIMULATED_SCHEME = "simulated://"
_REGISTRY: dict[str, SimulatedHost] = {}
_REGISTRY_LOCK = threading.Lock()
_QUIET_DEFINE = [("Defined", "Updated")]
_QUIET_REPLUG = [("Stopped", "Destroyed"), ("Started", "Booted")]


def is_simulated_uri(uri: str) -> bool:
    """True for the URIs a ``SimulatedHost`` serves (``simulated://`` and ``test://``)."""
    return uri.startswith((SIMULATED_SCHEME, "test://"))


def registered_host(uri: str) -> SimulatedHost | None:
    """Returns the open simulated host of this process at ``uri``, if any."""
    with _REGISTRY_LOCK:
        return _REGISTRY.get(uri)


class SimulatedHost(LibvirtHost):
    """A ``Hypervisor`` on the test driver, adding attach, detach and migration."""

    def __init__(self, uri: str, spec: SimHostSpec | None = None) -> None:
        super().__init__(uri)
        if spec is None and uri.startswith(SIMULATED_SCHEME):
            spec = load_spec(uri.removeprefix(SIMULATED_SCHEME))
        self.spec = spec
        self._refused: set[PciAddress] = set(spec.refuse_detach) if spec else set()
        self._migration_failure: str | None = spec.fail_migration if spec else None
        self._released = threading.Event()  # never set: a refusing guest never releases

    # -- behaviour switches ------------------------------------------------------

    def refuse_detach(self, address: PciAddress, refuse: bool = True) -> None:
        """Makes the guest keep (or, with ``refuse=False``, release) ``address`` on detach."""
        if refuse:
            self._refused.add(PciAddress(address))
        else:
            self._refused.discard(PciAddress(address))

    def fail_migrations(self, reason: str | None) -> None:
        """Makes every migration from this host fail with ``reason`` (None: succeed)."""
        self._migration_failure = reason

    # -- connection --------------------------------------------------------------

    def open(self) -> None:
        """Writes the node XML (from the spec), opens it, and registers the host."""
        if self._conn is not None:
            return
        if self.spec is None:
            self.libvirt_uri = self.uri
            super().open()
        else:
            handle, path = tempfile.mkstemp(prefix="hostdev-sim-", suffix=".xml")
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as out:
                    out.write(build_node_xml(self.spec))
                # The test driver parses the file at open() and keeps its state in memory.
                self.libvirt_uri = "test://" + str(Path(path).resolve())
                super().open()
            finally:
                os.unlink(path)
        with _REGISTRY_LOCK:
            _REGISTRY[self.uri] = self

    def close(self) -> None:
        """Unregisters the host and closes its connection; idempotent."""
        with _REGISTRY_LOCK:
            if _REGISTRY.get(self.uri) is self:
                del _REGISTRY[self.uri]
        super().close()

    def pci_backends(self) -> tuple[str, ...] | None:
        """A simulated host passes devices through as if it had VFIO."""
        return ("vfio",)

    # -- hot-plug ----------------------------------------------------------------

    def _redefine(self, uuid: str, xml: str, *, replug: bool) -> None:
        self.quiet_events(uuid, _QUIET_DEFINE)
        self.define_xml(xml)
        if replug:
            self.quiet_events(uuid, _QUIET_REPLUG)
            dom = self.lookup(uuid)
            self._call("detach", dom.destroy)
            self._call("attach", dom.create)

    def attach_hostdev(self, uuid: str, address: PciAddress, timeout_s: float) -> None:
        """Adds the hostdev to the definition and, when running, to the live domain."""
        active = self.is_active(uuid)
        live = active and address in read_hostdevs(self.domain_xml(uuid))
        config_xml = self.domain_xml(uuid, inactive=True)
        if address in read_hostdevs(config_xml) and (live or not active):
            return
        self._redefine(uuid, with_hostdev(config_xml, address), replug=active and not live)
        log.info("simulated_hostdev_attached", vm=uuid, address=address)

    def detach_hostdev(self, uuid: str, address: PciAddress, timeout_s: float) -> None:
        """Removes the hostdev, unless this host's guest refuses to release it."""
        active = self.is_active(uuid)
        live = active and address in read_hostdevs(self.domain_xml(uuid))
        config_xml = self.domain_xml(uuid, inactive=True)
        if live and address in self._refused:
            # What a guest without acpiphp does: nothing; the unplug times out.
            self._released.wait(timeout_s)
            raise DetachRefused(uuid, address, timeout_s)
        if address not in read_hostdevs(config_xml) and not live:
            return
        self._redefine(uuid, without_hostdev(config_xml, address), replug=live)
        log.info("simulated_hostdev_detached", vm=uuid, address=address)

    # -- migration ---------------------------------------------------------------

    def migrate(self, uuid: str, destination_uri: str, timeout_s: float) -> None:
        """Moves a running domain to the simulated host registered at ``destination_uri``."""
        if self._migration_failure is not None:
            raise MigrationFailed(uuid, destination_uri, self._migration_failure)
        destination = registered_host(destination_uri)
        if destination is None:
            raise MigrationFailed(uuid, destination_uri, "no simulated host is open at that "
                                  "URI in this process")
        if destination is self:
            raise MigrationFailed(uuid, destination_uri, "Attempt to migrate guest to the "
                                  "same host")
        if not self.is_active(uuid):
            raise MigrationFailed(uuid, destination_uri, "the domain is not running")
        xml = without_runtime_id(self.domain_xml(uuid))
        name = read_identity(xml)[1]
        # Report what real libvirt reports (Started/Migrated, Stopped/Migrated),
        # not the boot and destroy that emulate it.
        destination.define_xml(xml)
        destination.quiet_events(uuid, [("Started", "Booted")])
        destination.start(uuid)
        destination.emit(LifecycleEvent(uuid=uuid, name=name, event="Started",
                                        detail="Migrated", state="running"))
        self.quiet_events(uuid, [("Stopped", "Destroyed")])
        self.destroy(uuid)
        self.emit(LifecycleEvent(uuid=uuid, name=name, event="Stopped", detail="Migrated",
                                 state="stopped"))
        self.undefine(uuid)
        log.info("simulated_domain_migrated", vm=uuid, destination=destination_uri)

    def has_domain_at(self, destination_uri: str, uuid: str) -> bool:
        """Looks the domain up on the simulated host registered at ``destination_uri``."""
        destination = registered_host(destination_uri)
        return destination is not None and destination.domain(uuid) is not None
