"""Lifecycle reports: a ``VmStateReport`` when an event says something new to management.

libvirt sends several lifecycle events for one change (a start is
``Defined/Added`` then ``Started/Booted``), and a report reads the domain's
state and hostdevs when it is sent, not from the event. So:

- **coalesced**: the events of one domain that wait together for the bus
  loop thread become ONE report, which reads libvirt after the last of them
  was queued (it carries the last event's name). An event that arrives while
  that report reads libvirt queues a report of its own.
- **on change only**: a report that would say what this process last told
  management about the domain (the same ``state`` and ``hostdevs``) is not
  sent. Told means: sent in a ``VmStateReport``, or said by a ``StartAnswer``
  (``ok``: running, with its ``hostdevs``), which management believes as it
  believes a report. The report after a start therefore goes unsent, and the
  next change (a crash, a shutdown, a stop, a device leaving, a migration)
  differs from it and is sent. An event saying the domain stopped, crashed
  or went away (``Stopped``, ``Crashed``, ``Undefined``) is always reported,
  even when the domain runs again with the same devices by the time its
  report reads libvirt: management may have to hear that it left (a
  migration that went and came back). What was told is forgotten when the
  domain is gone and at every new round of announcements (a reconnect),
  after which every change is reported again; pings keep reconciling
  everything anyway.

A skipped report has taken its ``seq`` already (before it read libvirt):
management only compares numbers, so the gap changes nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import structlog

from hostdev.agent.boot_sequence import BootSequence
from hostdev.agent.errors import HypervisorError
from hostdev.agent.hypervisor import Hypervisor, LifecycleEvent
from hostdev.messages.base import PowerState
from hostdev.messages.bus.contract import BusLike
from hostdev.messages.commands import StartAnswer, VmStateReport
from hostdev.messages.pci_address import PciAddress

log = structlog.get_logger()

#: What management was told about a domain: its power state and hostdevs.
Told = tuple[PowerState, tuple[PciAddress, ...]]
#: Events whose report is sent even when it would repeat what was told.
ALWAYS_REPORTED = frozenset({"Stopped", "Crashed", "Undefined"})


@dataclass
class _Pending:
    """The events of one domain waiting for its report."""

    last: LifecycleEvent
    count: int = 1
    #: One of them is in ``ALWAYS_REPORTED``.
    always: bool = False


class LifecycleReports:
    """Reports one agent's lifecycle events to management, coalesced and on change only."""

    def __init__(self, guid: str, hypervisor: Hypervisor, bus: BusLike,
                 sequence: BootSequence) -> None:
        self.guid = guid
        self.hypervisor = hypervisor
        self.bus = bus
        self.sequence = sequence
        #: The events of each domain waiting for its report (any thread adds).
        self._pending: dict[str, _Pending] = {}
        self._pending_lock = threading.Lock()
        #: What management was last told about each domain (loop thread only).
        self._told: dict[str, Told] = {}

    def on_event(self, event: LifecycleEvent) -> None:
        """Queues a report of the event's domain on the bus loop (from the event thread)."""
        always = event.event in ALWAYS_REPORTED
        with self._pending_lock:
            queued = self._pending.get(event.uuid)
            if queued is None:
                self._pending[event.uuid] = _Pending(event, always=always)
            else:
                queued.last, queued.count = event, queued.count + 1
                queued.always = queued.always or always
        if queued is None:
            self.bus.call_soon_threadsafe(lambda: self.report(event.uuid))

    def report(self, uuid: str) -> None:
        """Reports the domain's state now, unless management was told exactly that (loop thread)."""
        with self._pending_lock:
            pending = self._pending.pop(uuid, None)
        if pending is None:
            return
        event = pending.last
        seq = self.sequence.take()  # before libvirt is read (hostdev.agent.boot_sequence)
        try:
            domain = self.hypervisor.domain(uuid)
        except HypervisorError as exc:
            log.error("vm_state_report_failed", host=self.guid, vm=uuid, error=str(exc))
            return
        state: PowerState = domain.state if domain else "stopped"
        hostdevs = domain.hostdevs if domain else ()
        libvirt_event = f"{event.event}/{event.detail}"
        if not pending.always and self._told.get(uuid) == (state, hostdevs):
            log.debug("vm_state_unchanged", host=self.guid, vm=uuid, state=state,
                      libvirt_event=libvirt_event, events=pending.count)
            return
        self.bus.send_to_mgmt(self.guid, VmStateReport(
            guid=self.guid, vm_uuid=uuid, vm_name=event.name, state=state, event=libvirt_event,
            hostdevs=hostdevs, boot_id=self.sequence.boot_id, seq=seq))
        if domain is None:
            self._told.pop(uuid, None)  # gone: nothing left to compare with
        else:
            self._told[uuid] = (state, hostdevs)
        log.info("vm_state_reported", host=self.guid, vm=uuid, state=state,
                 libvirt_event=libvirt_event, events=pending.count)

    def answered(self, answer: StartAnswer) -> StartAnswer:
        """Notes what a ``StartAnswer`` tells management (loop thread); returns it."""
        if answer.ok:
            self._told[answer.vm_uuid] = ("running", tuple(answer.hostdevs))
        return answer

    def forget(self) -> None:
        """Forgets what was told: from now on every domain's next report is sent."""
        self._told.clear()
