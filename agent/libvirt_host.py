"""``LibvirtHost``: the ``Hypervisor`` on real libvirt.

Lifecycle and device-removed events arrive on one process-wide thread running
``virEventRunDefaultImpl``; the default event implementation is registered
before the first ``open()``, as libvirt requires.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import libvirt
import structlog

from hostdev.agent.domain_xml import (
    hostdev_xml,
    pci_backends,
    read_hostdevs,
    with_domain_type,
    with_numatune,
)
from hostdev.agent.errors import DetachRefused, DomainNotFound, HypervisorError, MigrationFailed
from hostdev.agent.hypervisor import HostFacts, LifecycleEvent, LifecycleListener
from hostdev.agent.libvirt_names import DETAILS, EVENT_STATES, EVENTS, STATES
from hostdev.agent.libvirt_resources import HostResources, has_domain_at
from hostdev.agent.nodedev_xml import parse_pci_device
from hostdev.agent.pci_device import NodePciDevice
from hostdev.messages.base import PowerState
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DomainInfo

log = structlog.get_logger()

# libvirt prints every error on stderr as well as raising it; we raise ours.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_POLL_S = 0.25  # upper bound between re-checks while waiting for a condition

_loop_lock = threading.Lock()
_loop_started = False


def _ensure_event_loop() -> None:
    """Registers libvirt's default event implementation once and runs it on a thread."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


#: libvirt codes worth retrying; any other (invalid UUID, no domain...) fails again the same way.
TRANSIENT_CODES = frozenset(getattr(libvirt, f"VIR_ERR_{name}") for name in (
    "SYSTEM_ERROR", "NO_CONNECT", "INVALID_CONN", "RPC", "OPERATION_TIMEOUT",
    "AGENT_UNRESPONSIVE", "RESOURCE_BUSY", "INTERNAL_ERROR"))


def _reason(exc: libvirt.libvirtError) -> str:
    return exc.get_error_message() or str(exc)


def hypervisor_error(op: str, exc: libvirt.libvirtError, reason: str = "") -> HypervisorError:
    """Returns the ``HypervisorError`` for a libvirt failure, classified transient or not."""
    code = exc.get_error_code()
    return HypervisorError(op, reason or _reason(exc), code=code,
                           transient=code in TRANSIENT_CODES)


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


class LibvirtHost(HostResources):
    """The ``Hypervisor`` protocol over one libvirt connection."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        #: what ``open()`` hands libvirt; the simulated host points it at its node file
        self.libvirt_uri = uri
        self._conn: Any = None
        self._listener: LifecycleListener | None = None
        self._changed = threading.Condition()
        self._callbacks: list[int] = []
        self._quiet: dict[str, list[tuple[str, str]]] = {}
        self._quiet_lock = threading.Lock()

    # -- connection -------------------------------------------------------------

    def open(self) -> None:
        """Connects to ``uri`` and registers lifecycle and device-removed callbacks."""
        if self._conn is not None:
            return
        _ensure_event_loop()
        try:
            self._conn = libvirt.open(self.libvirt_uri)
        except libvirt.libvirtError as exc:
            raise hypervisor_error("connect", exc, f"cannot open libvirt at "
                                   f"{self.libvirt_uri}: {_reason(exc)}") from None
        self._callbacks = [
            self._conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None),
            self._conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_device_removed, None),
        ]

    def close(self) -> None:
        """Deregisters callbacks and closes the connection; idempotent."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for callback in self._callbacks:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback)
        self._callbacks = []
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    @property
    def conn(self) -> Any:
        """The open ``virConnect``; raises when ``open()`` was not called."""
        if self._conn is None:
            raise HypervisorError("connect", f"libvirt at {self.uri} is not open; call open()")
        return self._conn

    def set_lifecycle_listener(self, listener: LifecycleListener | None) -> None:
        """Sets the callback for lifecycle events (called on the libvirt event thread)."""
        self._listener = listener

    # -- events ------------------------------------------------------------------

    def quiet_events(self, uuid: str, events: Iterable[tuple[str, str]]) -> None:
        """Swallows the next matching ``(event, detail)`` pairs of one domain.

        The simulated host uses it to hide the restart it does to emulate hot-plug.
        """
        with self._quiet_lock:
            self._quiet.setdefault(uuid, []).extend(events)

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        name = EVENTS[event] if 0 <= event < len(EVENTS) else str(event)
        details = DETAILS.get(name, ())
        detail_name = details[detail] if 0 <= detail < len(details) else str(detail)
        uuid = dom.UUIDString()
        with self._changed:
            self._changed.notify_all()
        with self._quiet_lock:
            pending = self._quiet.get(uuid, [])
            if (name, detail_name) in pending:
                pending.remove((name, detail_name))
                return
        try:
            state = STATES.get(dom.state()[0], "unknown")
        except libvirt.libvirtError:
            state = EVENT_STATES.get(name, "unknown")
        self.emit(LifecycleEvent(uuid=uuid, name=dom.name(), event=name, detail=detail_name,
                                 state=state))

    def emit(self, event: LifecycleEvent) -> None:
        """Hands one lifecycle event to the listener, surviving the listener's bugs."""
        listener = self._listener
        if listener is not None:
            try:
                listener(event)
            except Exception:  # the event thread must survive a listener's bug
                log.exception("lifecycle_listener_failed", vm=event.uuid,
                              libvirt_event=event.event)

    def _on_device_removed(self, _conn: Any, _dom: Any, _alias: str, _opaque: Any) -> None:
        with self._changed:
            self._changed.notify_all()

    def _wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Waits until ``condition()`` holds (re-checked on every event) or the timeout."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._changed:
                self._changed.wait(min(remaining, _POLL_S))
        return True

    # -- lookups -----------------------------------------------------------------

    def lookup(self, uuid: str) -> Any:
        """Returns the ``virDomain`` with that UUID; raises ``DomainNotFound``."""
        try:
            return self.conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise DomainNotFound(uuid) from None
            raise hypervisor_error("lookup", exc) from None

    def domain_xml(self, uuid: str, *, inactive: bool = False) -> str:
        """Returns a domain's live (or, with ``inactive``, persistent) XML."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(self.lookup(uuid).XMLDesc(flags))

    def is_active(self, uuid: str) -> bool:
        """True when the domain runs (or is paused)."""
        return bool(self.lookup(uuid).isActive())

    def define_xml(self, xml: str) -> None:
        """Defines a domain from XML; raises ``HypervisorError`` with libvirt's reason."""
        try:
            self.conn.defineXML(xml)
        except libvirt.libvirtError as exc:
            raise hypervisor_error("define", exc) from None

    def facts(self) -> HostFacts:
        """Returns host name, CPUs, memory and hypervisor version."""
        info = self.conn.getInfo()
        return HostFacts(hostname=self.conn.getHostname(), cpus=int(info[2]),
                         memory_mb=int(info[1]), hypervisor=str(self.conn.getType()).lower(),
                         hypervisor_version=_version(int(self.conn.getVersion())))

    def pci_devices(self) -> tuple[NodePciDevice, ...]:
        """Returns every PCI node device of the host."""
        flags = libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV
        found = (parse_pci_device(dev.XMLDesc(0)) for dev in self.conn.listAllDevices(flags))
        return tuple(sorted((d for d in found if d is not None), key=lambda d: d.address))

    def pci_backends(self) -> tuple[str, ...] | None:
        """Reads the PCI passthrough backends from the domain capabilities; None if unknown."""
        try:
            return pci_backends(self.conn.getDomainCapabilities(None, None, None, None, 0))
        except libvirt.libvirtError:
            return None

    def _info(self, dom: Any) -> DomainInfo:
        return DomainInfo(uuid=dom.UUIDString(), name=dom.name(),
                          state=STATES.get(dom.state()[0], "unknown"),
                          hostdevs=self.read_devices(dom.XMLDesc(0)))

    def domains(self) -> tuple[DomainInfo, ...]:
        """Returns every defined or running domain with its state and hostdevs."""
        result = []
        for dom in self.conn.listAllDomains(0):
            try:
                result.append(self._info(dom))
            except libvirt.libvirtError:
                continue  # undefined between listing and reading: not there any more
        return tuple(result)

    def domain(self, uuid: str) -> DomainInfo | None:
        """Returns one domain, or None when no domain has that UUID."""
        try:
            return self._info(self.lookup(uuid))
        except (DomainNotFound, libvirt.libvirtError):
            return None

    # -- lifecycle ---------------------------------------------------------------

    def domain_type(self) -> str:
        """Returns the domain type to define: ``test``, ``kvm``, or ``qemu`` (TCG) without KVM."""
        if str(self.conn.getType()).upper() == "TEST":
            return "test"
        try:
            self.conn.getDomainCapabilities(None, None, None, "kvm", 0)
            return "kvm"
        except libvirt.libvirtError:
            return "qemu"  # no KVM on this host: libvirt would refuse type='kvm'

    def define(self, xml: str) -> None:
        """Defines (or redefines) a domain, of the type this host runs (``with_domain_type``)."""
        self.define_xml(with_domain_type(xml, self.domain_type()))

    def _call(self, operation: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except libvirt.libvirtError as exc:
            raise hypervisor_error(operation, exc) from None

    def start(self, uuid: str) -> None:
        """Starts a defined domain; a running domain is left alone."""
        dom = self.lookup(uuid)
        if not dom.isActive():
            self._call("start", dom.create)

    def shutdown(self, uuid: str, timeout_s: float) -> PowerState:
        """Asks the guest to power off and waits up to ``timeout_s`` for it."""
        dom = self.lookup(uuid)
        if dom.isActive():
            self._call("shutdown", dom.shutdown)
            self._wait_for(lambda: not dom.isActive(), timeout_s)
        return STATES.get(dom.state()[0], "unknown")

    def destroy(self, uuid: str) -> None:
        """Powers a domain off at once; a stopped domain is left alone."""
        dom = self.lookup(uuid)
        if dom.isActive():
            self._call("destroy", dom.destroy)

    def undefine(self, uuid: str) -> None:
        """Removes a domain's definition; an absent domain is left alone."""
        try:
            dom = self.lookup(uuid)
        except DomainNotFound:
            return
        self._call("undefine", dom.undefine)

    # -- devices -----------------------------------------------------------------

    def device_xml(self, address: PciAddress) -> str:
        """Returns the XML that attaches or detaches ``address``: a managed ``<hostdev>``."""
        return hostdev_xml(address)

    def read_devices(self, xml: str) -> tuple[PciAddress, ...]:
        """Returns the passthrough addresses a domain's XML holds: its PCI hostdevs."""
        return read_hostdevs(xml)

    def _placement(self, uuid: str, address: PciAddress) -> tuple[Any, bool, bool, bool]:
        dom = self.lookup(uuid)
        active = bool(dom.isActive())
        live = address in self.read_devices(dom.XMLDesc(0)) if active else False
        config = address in self.read_devices(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        return dom, active, live, config

    def attach_hostdev(self, uuid: str, address: PciAddress, timeout_s: float) -> None:
        """Attaches a device live (when running) and in the config; present parts are kept."""
        dom, active, live, config = self._placement(uuid, address)
        flags = (libvirt.VIR_DOMAIN_AFFECT_LIVE if active and not live else 0) | (
            0 if config else libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        if flags:
            self._call("attach", lambda: dom.attachDeviceFlags(self.device_xml(address), flags))
        if active and not self._wait_for(
                lambda: address in self.read_devices(dom.XMLDesc(0)), timeout_s):
            raise HypervisorError("attach", f"{address} did not appear in domain {uuid} "
                                  f"within {timeout_s:g} s")

    def detach_hostdev(self, uuid: str, address: PciAddress, timeout_s: float) -> None:
        """Detaches a device and waits for DEVICE_REMOVED; restores the config if refused."""
        dom, _active, live, config = self._placement(uuid, address)
        flags = (libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0) | (
            libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0)
        if not flags:
            return
        self._call("detach", lambda: dom.detachDeviceFlags(self.device_xml(address), flags))
        if not live or self._wait_for(
                lambda: address not in self.read_devices(dom.XMLDesc(0)), timeout_s):
            return
        # The guest kept it: put it back in the config so live and config agree.
        if address not in self.read_devices(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)):
            self._call("attach", lambda: dom.attachDeviceFlags(
                self.device_xml(address), libvirt.VIR_DOMAIN_AFFECT_CONFIG))
        raise DetachRefused(uuid, address, timeout_s)

    def reset_pci_device(self, address: PciAddress) -> None:
        """Resets a host PCI device (``virNodeDeviceReset``: FLR, or a slot or bus reset)."""
        lookup = self.conn.nodeDeviceLookupByName  # a missing device fails the reset too
        self._call("reset", lambda: lookup(PciAddress(address).libvirt_name).reset())

    # -- migration ---------------------------------------------------------------

    def migrate(self, uuid: str, destination_uri: str, timeout_s: float, *,
                copy_storage: bool = False, numa_node: int | None = None) -> None:
        """Live peer-to-peer migration, copying the VM's own volumes when asked.

        ``copy_storage`` adds ``VIR_MIGRATE_NON_SHARED_INC``: the overlays'
        data is copied into overlays on the same base on the destination
        (``prepare_volume_at``). ``numa_node`` binds the memory to that node
        in the destination's definition. Aborted after ``timeout_s``.
        """
        dom = self.lookup(uuid)
        params = {} if numa_node is None else {libvirt.VIR_MIGRATE_PARAM_DEST_XML: (
            with_numatune(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE), numa_node))}
        flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                 | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
                 | (libvirt.VIR_MIGRATE_NON_SHARED_INC if copy_storage else 0))

        def abort() -> None:
            with contextlib.suppress(libvirt.libvirtError):
                dom.abortJob()

        timer = threading.Timer(timeout_s, abort)
        timer.daemon = True
        timer.start()
        try:
            dom.migrateToURI3(destination_uri, params, flags)
        except libvirt.libvirtError as exc:
            raise MigrationFailed(uuid, destination_uri, _reason(exc)) from None
        finally:
            timer.cancel()

    def has_domain_at(self, destination_uri: str, uuid: str) -> bool:
        """Tells whether the host at ``destination_uri`` has the domain (read-only)."""
        return has_domain_at(destination_uri, uuid)
