"""Simulated migration between agents in separate processes, and faults switched at run time.

Simulated hosts live in their agent's process (libvirt's test driver keeps
domains in memory), so ``SimulatedHost.migrate`` reaches only hosts of the
same process. For end-to-end tests with agents as processes, a host whose
URI is ``simulated:///<dir>/<name>.json`` also has a mailbox beside its
spec, ``<dir>/<name>.incoming/``:

- the source writes the domain's XML there as ``<uuid>.json`` (atomically),
  then destroys and undefines its copy (reporting ``Stopped/Migrated``) --
  the hand-over real libvirt does, which outlives the agent that asked for it;
- the destination's watcher thread (and ``open()``, before the agent
  announces) claims every domain it finds there (renames it ``<uuid>.taking``),
  defines and starts it, reports ``Started/Migrated`` and deletes the file. An
  agent that is down meanwhile finds the domain at its next start.
- like libvirt, the source returns once the destination runs the domain: while
  the destination's agent is alive (its watcher holds a lock on
  ``.alive`` in the mailbox) it waits up to the migration's timeout, and takes
  the domain back (the migration fails, the domain stays) if it was never
  claimed; with no agent there it goes on after ``PICKUP_WAIT_S``, as the
  libvirtd the agent stands for would still take it in.

Faults for tests, switched without restarting the agent: a JSON file
``<dir>/<name>.faults.json`` read by the same watcher whenever it changes::

    {"version": 3, "refuse_detach": ["28:00.2"], "fail_migration": "reason or null",
     "fail_attach": ["28:00.1"], "fail_reset": ["28:00.3"], "migrate_hold_s": 5,
     "migrate_delay_s": 5}

``migrate_hold_s`` holds the source's migration before the hand-over (the
devices detached, the domain still here), ``migrate_delay_s`` after it
(before the answer), so a test can kill the agent mid-migration either way. Each change
is logged as ``simulated_faults_applied`` with the file's ``version``.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import msgspec
import structlog

from hostdev.agent import simulated_state
from hostdev.agent.domain_xml import (
    read_identity,
    read_own_volumes,
    with_numatune,
    without_runtime_id,
)
from hostdev.agent.errors import HypervisorError, MigrationFailed
from hostdev.agent.hypervisor import LifecycleEvent
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DomainInfo

log = structlog.get_logger()

SCHEME = "simulated://"
#: How often the watcher looks at the mailbox and the faults file, in seconds.
POLL_S = 0.1
#: How long a hand-over waits for a destination whose agent is down.
PICKUP_WAIT_S = 2.0
#: The mailbox file a running destination's watcher holds locked.
ALIVE_FILE = ".alive"


def _address(kind: type, value: Any) -> Any:
    if kind is PciAddress:
        return PciAddress(value)
    raise NotImplementedError(f"cannot decode {kind}")


def _spec_path(uri: str) -> Path | None:
    return Path(uri.removeprefix(SCHEME)) if uri.startswith(SCHEME) else None


def mailbox(uri: str) -> Path | None:
    """Returns the directory other processes hand domains to this host through."""
    spec = _spec_path(uri)
    return spec.with_name(f"{spec.stem}.incoming") if spec else None


def faults_file(uri: str) -> Path | None:
    """Returns the faults file of a simulated host."""
    spec = _spec_path(uri)
    return spec.with_name(f"{spec.stem}.faults.json") if spec else None


def write_faults(uri: str, **faults: Any) -> None:
    """Writes a host's faults file atomically (for tests); the watcher applies it.

    Raises:
        msgspec.ValidationError: a fault is misspelt or of the wrong type (the
            watcher would otherwise read the file as "no faults").
    """
    path = faults_file(uri)
    assert path is not None, f"{uri} is not a simulated:// URI"
    msgspec.convert(faults, Faults, dec_hook=_address)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(faults), encoding="utf-8")
    os.replace(temporary, path)


class Faults(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The faults file: what a simulated host fails at, switched at run time."""

    version: int | None = None
    refuse_detach: tuple[PciAddress, ...] = ()
    fail_migration: str | None = None
    fail_attach: tuple[PciAddress, ...] = ()
    fail_reset: tuple[PciAddress, ...] = ()
    migrate_hold_s: float = 0.0
    migrate_delay_s: float = 0.0


class HandedOver(msgspec.Struct, frozen=True):
    """A domain in a mailbox: its XML and the URI of the host it left."""

    xml: str
    source: str = ""


class MailboxHost(Protocol):
    """What the mailbox and the faults file need of a simulated host (``SimulatedHost``)."""

    @property
    def uri(self) -> str: ...
    def refuse_detach(self, address: PciAddress, refuse: bool = True) -> None: ...
    def fail_migrations(self, reason: str | None) -> None: ...
    def fail_resets(self, addresses: Iterable[PciAddress]) -> None: ...
    def domain(self, uuid: str) -> DomainInfo | None: ...
    def domain_xml(self, uuid: str, *, inactive: bool = False) -> str: ...
    def define_xml(self, xml: str) -> None: ...
    def is_active(self, uuid: str) -> bool: ...
    def quiet_events(self, uuid: str, events: Iterable[tuple[str, str]]) -> None: ...
    def start(self, uuid: str) -> None: ...
    def destroy(self, uuid: str) -> None: ...
    def undefine(self, uuid: str) -> None: ...
    def emit(self, event: LifecycleEvent) -> None: ...
    def volumes(self, pool: str) -> tuple[str, ...] | None: ...
    def create_volume(self, pool: str, name: str, base: str) -> None: ...


class Watcher:
    """Picks up handed-over domains and applies faults for one simulated host."""

    def __init__(self, host: MailboxHost) -> None:
        self.host = host
        # Worked out once: every host is polled ten times a second.
        self._box = mailbox(host.uri)
        self._faults = faults_file(host.uri)
        self.fail_attach: set[PciAddress] = set()
        self.migrate_delay_s = 0.0
        self.migrate_hold_s = 0.0
        self._refused_by_file: set[PciAddress] = set()
        self._faults_mtime: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._alive: int | None = None

    def start(self) -> None:
        """Applies faults and picks up waiting domains now, then keeps watching."""
        box = self._box
        if box is not None:
            box.mkdir(parents=True, exist_ok=True)
            self._alive = os.open(box / ALIVE_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:  # held until stop() or the process ends
                fcntl.flock(self._alive, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("simulated_mailbox_taken", host=self.host.uri,
                            hint="another agent process watches this host's mailbox")
        self.poll()
        self._thread = threading.Thread(target=self._run, name="hostdev-sim-watch",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops watching; idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._alive is not None:
            os.close(self._alive)  # releases the lock: hand-overs stop waiting for us
            self._alive = None

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.poll()
            except Exception as exc:  # the next tick tries again
                log.error("simulated_watch_failed", host=self.host.uri, error=str(exc))

    def poll(self) -> None:
        """Applies a changed faults file and takes in every handed-over domain."""
        self._apply_faults()
        box = self._box
        if box is None:
            return
        try:  # one listing for both kinds
            names = sorted(entry.name for entry in os.scandir(box))
        except (FileNotFoundError, NotADirectoryError):
            return
        # ``*.taking``: a claim this host's agent died in the middle of.
        for name in names:
            if name.endswith(".taking"):
                self._take_in(box / name)
        for name in names:
            if not name.endswith(".json"):
                continue
            entry = box / name
            claimed = entry.with_suffix(".taking")
            try:
                os.rename(entry, claimed)
            except FileNotFoundError:
                continue  # the source took it back (its migration timed out)
            self._take_in(claimed)

    def _apply_faults(self) -> None:
        path = self._faults
        try:
            mtime = path.stat().st_mtime_ns if path else None
        except FileNotFoundError:
            mtime = None
        if mtime == self._faults_mtime:
            return
        self._faults_mtime = mtime
        faults = Faults()
        if mtime is not None and path is not None:
            faults = msgspec.json.decode(path.read_bytes(), type=Faults, dec_hook=_address)
        for address in self._refused_by_file:
            self.host.refuse_detach(address, False)
        self._refused_by_file = set(faults.refuse_detach)
        for address in self._refused_by_file:
            self.host.refuse_detach(address, True)
        self.host.fail_migrations(faults.fail_migration)
        self.host.fail_resets(faults.fail_reset)
        self.fail_attach = set(faults.fail_attach)
        self.migrate_delay_s = faults.migrate_delay_s
        self.migrate_hold_s = faults.migrate_hold_s
        log.info("simulated_faults_applied", host=self.host.uri, version=faults.version,
                 faults=msgspec.to_builtins(faults, enc_hook=str))

    def _take_in(self, entry: Path) -> None:
        handed = msgspec.json.decode(entry.read_bytes(), type=HandedOver)
        xml = handed.xml
        uuid, name = read_identity(xml)
        host = self.host
        for volume in read_own_volumes(xml):  # what libvirt's storage migration copies into
            if volume.volume not in (host.volumes(volume.pool) or ()):
                host.create_volume(volume.pool, volume.volume, volume.base)
        if host.domain(uuid) is None:
            host.define_xml(xml)
        if not host.is_active(uuid):
            host.quiet_events(uuid, [("Started", "Booted")])
            host.start(uuid)
        entry.unlink()
        host.emit(LifecycleEvent(uuid=uuid, name=name, event="Started", detail="Migrated",
                                 state="running"))
        log.info("simulated_domain_arrived", vm=uuid, host=host.uri, source=handed.source)


def watch(host: MailboxHost) -> Watcher | None:
    """Starts the watcher of a simulated:// host; None for a host without a mailbox.

    The host owns the returned watcher and stops it when it closes.
    """
    if mailbox(host.uri) is None:
        return None
    watcher = Watcher(host)
    watcher.start()
    return watcher


def check_attach(watcher: Watcher | None, uuid: str, address: PciAddress) -> None:
    """Raises the attach failure the faults file asks for, if any."""
    if watcher is not None and PciAddress(address) in watcher.fail_attach:
        raise HypervisorError("attach", f"simulated failure attaching {address} to {uuid} "
                              "(fail_attach in the faults file)")


def migrated_xml(live_xml: str, numa_node: int | None) -> str:
    """Returns the definition a migration gives the destination (memory bound to ``numa_node``)."""
    xml = without_runtime_id(live_xml)
    return xml if numa_node is None else with_numatune(xml, numa_node)


def hand_over(host: MailboxHost, watcher: Watcher | None, uuid: str,
              destination_uri: str, timeout_s: float, *, numa_node: int | None = None) -> None:
    """Migrates a running domain to a simulated host of another process, through its mailbox.

    Raises:
        MigrationFailed: the destination is not a simulated:// host with a
            mailbox, the domain is not running here, or the destination's
            agent runs but did not take the domain in within ``timeout_s``.
    """
    box = mailbox(destination_uri)
    if box is None or not box.is_dir():
        raise MigrationFailed(uuid, destination_uri, "no simulated host is open at that URI "
                              "in this process or with a mailbox on this machine")
    if destination_uri == host.uri:
        raise MigrationFailed(uuid, destination_uri, "Attempt to migrate guest to the same host")
    if not host.is_active(uuid):
        raise MigrationFailed(uuid, destination_uri, "the domain is not running")
    if watcher is not None and watcher.migrate_hold_s:
        log.info("simulated_migration_holding", vm=uuid, hold_s=watcher.migrate_hold_s)
        time.sleep(watcher.migrate_hold_s)  # before the hand-over: the domain stays here
    xml = migrated_xml(host.domain_xml(uuid), numa_node)
    name = read_identity(xml)[1]
    temporary = box / f".{uuid}.tmp"
    temporary.write_bytes(msgspec.json.encode(HandedOver(xml=xml, source=host.uri)))
    handed = box / f"{uuid}.json"
    os.replace(temporary, handed)
    _wait_taken_in(box, uuid, destination_uri, timeout_s)
    host.quiet_events(uuid, [("Stopped", "Destroyed")])
    host.destroy(uuid)
    host.emit(LifecycleEvent(uuid=uuid, name=name, event="Stopped", detail="Migrated",
                             state="stopped"))
    host.undefine(uuid)
    delay = watcher.migrate_delay_s if watcher is not None else 0.0
    log.info("simulated_migration_handed_over", vm=uuid, destination=destination_uri,
             delay_s=delay)
    if delay:
        time.sleep(delay)  # the window a test kills the agent in


def _wait_taken_in(box: Path, uuid: str, destination_uri: str, timeout_s: float) -> None:
    """Waits until the destination runs a handed-over domain (see the module docstring)."""
    handed, claimed = box / f"{uuid}.json", box / f"{uuid}.taking"
    started = time.monotonic()
    while handed.exists() or claimed.exists():
        waited = time.monotonic() - started
        if not _watched(box):
            if waited >= PICKUP_WAIT_S:
                return  # no agent there: its libvirtd would take the domain in
        elif waited >= timeout_s and handed.exists():
            try:
                handed.unlink()  # never claimed: the domain stays here
            except FileNotFoundError:
                pass  # claimed just now: it is being started there
            else:
                raise MigrationFailed(uuid, destination_uri, "the destination did not take "
                                      f"the domain in within {timeout_s:g} s")
        time.sleep(POLL_S / 4)


def _watched(box: Path) -> bool:
    """Tells whether an agent process watches a mailbox (holds its ``.alive`` lock)."""
    try:
        fd = os.open(box / ALIVE_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def spec_path(uri: str) -> Path | None:
    """Returns the spec file of a simulated:// host (of any process)."""
    return _spec_path(uri)


def has_domain(destination_uri: str, uuid: str) -> bool:
    """Tells whether a domain was handed to a simulated host of another process."""
    box = mailbox(destination_uri)
    if box is not None and any((box / f"{uuid}{suffix}").exists()
                               for suffix in (".json", ".taking")):
        return True
    spec = _spec_path(destination_uri)
    state = simulated_state.state_path(spec) if spec else None
    if state is not None and state.exists():
        return uuid in state.read_text(encoding="utf-8")
    return False
