"""``SimulatedHost``: a host on libvirt's ``test:///`` driver with hot-plug and migration.

The test driver defines, starts and stops domains and lists node devices, but
has no attach, detach or migration. This module adds them:

- attach/detach rewrite the persistent definition and, for a running domain,
  restart it quietly (the restart's lifecycle events are swallowed), so the
  live XML shows the change exactly as a real hot-plug would;
- migration moves the domain between simulated hosts that share a
  ``SimulatedHosts`` (open hosts by URI; the demo and tests give one to all
  the hosts of a process): defined and started on the destination,
  destroyed and undefined on the source. A destination not among them is
  another process's host, reached through its mailbox (``simulated_store``);
- failures on demand: a device whose detach the guest refuses (like a guest
  without ``acpiphp``: the device stays, the detach times out) and a
  migration that fails.

URIs: ``simulated:///<abs path>/spec.json`` builds the node XML from a JSON
spec (see ``nodedev_xml``); ``test:///<abs path>/node.xml`` uses a node file as is.

Persistence: a spec with ``"persist": true`` keeps its domains in
``<spec>.state.json`` next to it, rewritten after every change (define, start,
stop, undefine, hot-plug, migration) and loaded at ``open()`` instead of the
spec's ``domains``, so a restarted agent finds its host as a real one would:
the VMs it ran are still there, holding their devices.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import structlog

from hostdev.agent import simulated_state, simulated_store
from hostdev.agent.domain_xml import (
    read_hostdevs,
    read_identity,
    with_hostdev,
    without_hostdev,
)
from hostdev.agent.errors import DetachRefused, DomainNotFound, HypervisorError, MigrationFailed
from hostdev.agent.hypervisor import LifecycleEvent
from hostdev.agent.libvirt_host import LibvirtHost
from hostdev.agent.libvirt_resources import missing_base
from hostdev.agent.nodedev_xml import SimHostSpec, build_node_xml, load_spec
from hostdev.agent.pci_device import NodePciDevice
from hostdev.messages.base import PowerState
from hostdev.messages.pci_address import PciAddress

log = structlog.get_logger()

SIMULATED_SCHEME = "simulated://"
_QUIET_DEFINE = [("Defined", "Updated")]
_QUIET_REPLUG = [("Stopped", "Destroyed"), ("Started", "Booted")]


def is_simulated_uri(uri: str) -> bool:
    """True for the URIs a ``SimulatedHost`` serves (``simulated://`` and ``test://``)."""
    return uri.startswith((SIMULATED_SCHEME, "test://"))


class SimulatedHosts:
    """The open simulated hosts one migration reaches directly, by URI.

    Hosts given the same ``SimulatedHosts`` migrate to each other in memory;
    a host opened alone gets its own, so only it is found there.
    """

    def __init__(self) -> None:
        self._hosts: dict[str, SimulatedHost] = {}
        self._lock = threading.Lock()  # agents open and close hosts on their own threads

    def add(self, host: SimulatedHost) -> None:
        """Makes ``host`` the one open at its URI."""
        with self._lock:
            self._hosts[host.uri] = host

    def remove(self, host: SimulatedHost) -> None:
        """Forgets ``host``, unless another host opened at its URI since."""
        with self._lock:
            if self._hosts.get(host.uri) is host:
                del self._hosts[host.uri]

    def at(self, uri: str) -> SimulatedHost | None:
        """Returns the open host at ``uri``, if it is one of these."""
        with self._lock:
            return self._hosts.get(uri)


class SimulatedHost(LibvirtHost):
    """A ``Hypervisor`` on the test driver, adding attach, detach and migration."""

    def __init__(self, uri: str, spec: SimHostSpec | None = None, *,
                 hosts: SimulatedHosts | None = None) -> None:
        """Prepares the host at ``uri``; ``open()`` connects.

        Args:
            uri: ``simulated:///<spec.json>`` or ``test:///<node.xml>``.
            spec: the spec to use instead of reading the file the URI names.
            hosts: the hosts this one migrates to in memory (and joins when
                opened); without them it reaches other hosts only through
                their mailboxes.
        """
        super().__init__(uri)
        self.hosts = hosts if hosts is not None else SimulatedHosts()
        if spec is None and uri.startswith(SIMULATED_SCHEME):
            spec = load_spec(uri.removeprefix(SIMULATED_SCHEME))
        self.spec = spec
        self._refused: set[PciAddress] = set(spec.refuse_detach) if spec else set()
        self._migration_failure: str | None = spec.fail_migration if spec else None
        self._reset_failures: set[PciAddress] = set()
        #: How many times each device was reset (the simulated hardware's record).
        self.resets: dict[PciAddress, int] = {}
        self._released = threading.Event()  # never set: a refusing guest never releases
        self.state_file: Path | None = None
        if spec is not None and spec.persist and uri.startswith(SIMULATED_SCHEME):
            self.state_file = simulated_state.state_path(uri.removeprefix(SIMULATED_SCHEME))
        self._save_lock = threading.Lock()
        #: Takes in domains other processes hand over and applies the faults file.
        self.watcher: simulated_store.Watcher | None = None

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

    def fail_resets(self, addresses: Iterable[PciAddress]) -> None:
        """Makes the reset of these devices fail (none: every reset succeeds)."""
        self._reset_failures = {PciAddress(a) for a in addresses}

    # -- connection --------------------------------------------------------------

    def open(self) -> None:
        """Writes the node XML (from the spec), opens it, and joins its ``SimulatedHosts``."""
        if self._conn is not None:
            return
        if self.spec is None:
            self.libvirt_uri = self.uri
            super().open()
        else:
            node_xml = build_node_xml(self.spec)
            if self.state_file is not None and self.state_file.exists():
                saved, volumes = simulated_state.load_state(self.state_file)
                bare = build_node_xml(replace(self.spec, domains=()))
                node_xml = simulated_state.node_xml_with(bare, saved, volumes)
                log.info("simulated_domains_loaded", state_file=str(self.state_file),
                         domains=len(saved))
            handle, path = tempfile.mkstemp(prefix="hostdev-sim-", suffix=".xml")
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as out:
                    out.write(node_xml)
                # The test driver parses the file at open() and keeps its state in memory.
                self.libvirt_uri = "test://" + str(Path(path).resolve())
                super().open()
            finally:
                os.unlink(path)
        self.hosts.add(self)
        self.watcher = simulated_store.watch(self)  # other processes' migrations, faults

    def close(self) -> None:
        """Leaves its ``SimulatedHosts`` and closes its connection; idempotent."""
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.stop()
        self.hosts.remove(self)
        super().close()

    def pci_devices(self) -> tuple[NodePciDevice, ...]:
        """Returns the PCI node devices, with the host drivers of the spec.

        The test driver drops ``<driver>`` from the node devices it reads, so
        the spec's drivers are put back here.
        """
        drivers = {d.address: d.driver for d in self.spec.devices} if self.spec else {}
        return tuple(replace(d, driver=drivers.get(d.address, d.driver))
                     for d in super().pci_devices())

    def pci_backends(self) -> tuple[str, ...] | None:
        """A simulated host passes devices through as if it had VFIO."""
        return ("vfio",)

    # -- persistence -------------------------------------------------------------

    def save(self) -> None:
        """Writes every domain (definition, running or not) to the state file, atomically."""
        if self.state_file is None or self._conn is None:
            return
        with self._save_lock:
            domains = []
            for found in self.domains():
                try:
                    xml = self.domain_xml(found.uuid, inactive=True)
                except DomainNotFound:
                    continue  # undefined by another thread since it was listed
                domains.append({"xml": xml, "running": found.state in ("running", "paused")})
            temporary = self.state_file.with_name(self.state_file.name + ".tmp")
            temporary.write_text(json.dumps({"domains": domains, "volumes": self._own_volumes()},
                                            indent=1), encoding="utf-8")
            os.replace(temporary, self.state_file)

    def _own_volumes(self) -> dict[str, list[str]]:
        """Returns the XML of every volume not in the spec (VMs' own), by pool."""
        spec_pools = self.spec.pools if self.spec else {}
        found: dict[str, list[str]] = {}
        for pool_name, base_images in spec_pools.items():
            pool = self.conn.storagePoolLookupByName(pool_name)
            found[pool_name] = [pool.storageVolLookupByName(v).XMLDesc(0)
                                for v in pool.listVolumes() if v not in base_images]
        return found

    def create_volume(self, pool: str, name: str, base: str) -> None:
        """Creates a VM's own volume and saves the state."""
        super().create_volume(pool, name, base)
        self.save()

    def delete_volume(self, pool: str, name: str) -> None:
        """Deletes a volume and saves the state."""
        super().delete_volume(pool, name)
        self.save()

    def prepare_volume_at(self, destination_uri: str, pool: str, name: str,
                          base: str) -> None:
        """Checks the simulated destination has the base; gives it the overlay when in reach.

        A destination of another process only has its spec read here: its
        watcher creates the overlay when it takes the domain in.
        """
        destination = self.hosts.at(destination_uri)
        if destination is not None:
            volumes = destination.volumes(pool)
        else:
            path = simulated_store.spec_path(destination_uri)
            spec = load_spec(path) if path is not None and path.exists() else None
            volumes = spec.pools.get(pool) if spec is not None else None
        if volumes is None or base not in volumes:
            raise HypervisorError("storage", missing_base(destination_uri, pool, base, volumes))
        if destination is not None and name not in volumes:
            destination.create_volume(pool, name, base)

    def define_xml(self, xml: str) -> None:
        """Defines a domain and saves the state."""
        super().define_xml(xml)
        self.save()

    def start(self, uuid: str) -> None:
        """Starts a domain and saves the state."""
        super().start(uuid)
        self.save()

    def shutdown(self, uuid: str, timeout_s: float) -> PowerState:
        """Shuts a domain down and saves the state."""
        state = super().shutdown(uuid, timeout_s)
        self.save()
        return state

    def destroy(self, uuid: str) -> None:
        """Powers a domain off and saves the state."""
        super().destroy(uuid)
        self.save()

    def undefine(self, uuid: str) -> None:
        """Removes a domain and saves the state."""
        super().undefine(uuid)
        self.save()

    # -- hot-plug ----------------------------------------------------------------

    def _redefine(self, uuid: str, xml: str, *, replug: bool) -> None:
        self.quiet_events(uuid, _QUIET_DEFINE)
        self.define_xml(xml)
        if replug:
            self.quiet_events(uuid, _QUIET_REPLUG)
            dom = self.lookup(uuid)
            self._call("detach", dom.destroy)
            self._call("attach", dom.create)
            self.save()

    def attach_hostdev(self, uuid: str, address: PciAddress, timeout_s: float) -> None:
        """Adds the hostdev to the definition and, when running, to the live domain."""
        active = self.is_active(uuid)
        live = active and address in read_hostdevs(self.domain_xml(uuid))
        config_xml = self.domain_xml(uuid, inactive=True)
        if address in read_hostdevs(config_xml) and (live or not active):
            return
        simulated_store.check_attach(self.watcher, uuid, address)
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

    def reset_pci_device(self, address: PciAddress) -> None:
        """Resets a device of the simulated hardware: counted in ``resets``, or failed on demand.

        libvirt's test driver cannot reset node devices (``virNodeDeviceReset``
        answers code 3, not supported), and a simulated host stands for real
        hardware, so the reset happens here.
        """
        address = PciAddress(address)
        if address not in {device.address for device in self.pci_devices()}:
            raise HypervisorError("reset", f"the host has no PCI device {address}",
                                  transient=False)
        if address in self._reset_failures:
            raise HypervisorError("reset", f"simulated failure resetting {address} "
                                  "(fail_reset)", transient=False)
        self.resets[address] = self.resets.get(address, 0) + 1
        log.info("simulated_device_reset", address=str(address), resets=self.resets[address])

    # -- migration ---------------------------------------------------------------

    def migrate(self, uuid: str, destination_uri: str, timeout_s: float, *,
                copy_storage: bool = False, numa_node: int | None = None) -> None:
        """Moves a running domain to the simulated host at ``destination_uri``.

        Its own volumes wait there already (``prepare_volume_at``); the
        caller deletes them here afterwards, as after a real storage copy.
        With ``numa_node`` the destination's definition binds the memory to that node.
        """
        if self._migration_failure is not None:
            raise MigrationFailed(uuid, destination_uri, self._migration_failure)
        destination = self.hosts.at(destination_uri)
        if destination is None:  # another process's host, through its mailbox
            simulated_store.hand_over(self, self.watcher, uuid, destination_uri, timeout_s,
                                      numa_node=numa_node)
            return
        if destination is self:
            raise MigrationFailed(uuid, destination_uri, "Attempt to migrate guest to the "
                                  "same host")
        if not self.is_active(uuid):
            raise MigrationFailed(uuid, destination_uri, "the domain is not running")
        xml = simulated_store.migrated_xml(self.domain_xml(uuid), numa_node)
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
        """Looks the domain up on the simulated host at ``destination_uri``."""
        destination = self.hosts.at(destination_uri)
        if destination is None:
            return simulated_store.has_domain(destination_uri, uuid)
        return destination.domain(uuid) is not None
