"""Host registration, pings, power reports and the sweeper of silent hosts.

``StartupRoutingCommand`` creates or updates the host, reconciles its device
inventory (added, renamed, removed, quarantined) and the VMs it reports, and
is answered with ``StartupAnswer``. Pings keep a host Up and reconcile power
drift: a VM management thinks Running that the host reports stopped (or does
not report) becomes Stopped and its devices are released; a VM management
thinks Stopped that the host reports running becomes Running there and gets
the devices its domain holds (unless another VM holds them). A report changes
only the VMs management placed on that host (``foreign_domains.placed_on``);
any other domain it lists is recorded as foreign, never adopted. Reports are
applied in the order the agent took them (``report_order``): a stale one
changes nothing, and one taken before the last answer accepted for a VM does
not change that VM. The sweeper marks a silent host Disconnected, then Down;
placement only offers devices of Up hosts.

A message whose broker-validated ``user_id`` is an agent's (``agent-<guid>``)
and speaks for another host is refused (``Forbidden``): the bus dead-letters it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import timedelta
from typing import NamedTuple

import structlog
from sqlalchemy import select, update

from hostdev.messages.commands import (
    PingRoutingCommand,
    StartupAnswer,
    StartupRoutingCommand,
    VmStateReport,
)
from hostdev.messages.events import HostStatusChanged, PciDeviceAllocated
from hostdev.messages.values import DomainInfo, HostStatus
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.devices import cleaning, numa, pci_inventory
from hostdev.mgmt.errors import Forbidden
from hostdev.mgmt.hosts import foreign_domains, report_order
from hostdev.mgmt.hosts.report_order import Stamp
from hostdev.mgmt.persistence.models import (
    HOST_DISCONNECTED,
    HOST_DOWN,
    HOST_UP,
    OPERATOR_STATUSES,
    VM_ERROR,
    VM_RUNNING,
    VM_STOPPED,
    Host,
    VmInstance,
    utcnow,
)
from hostdev.mgmt.persistence.unit_of_work import TxContext
from hostdev.mgmt.placement import blocks
from hostdev.mgmt.vms.vm_lifecycle import VmLifecycleManager, offering_numa_policy
from hostdev.mgmt.vms.vm_states import VmEvent

log = structlog.get_logger()

_AGENT_USER = re.compile(r"^agent-(?P<guid>.+)$")


class Registration(NamedTuple):
    """The answer to a start-up, and whether its report was applied (not stale).

    ``placed``: the uuids of the VMs placed on the host once its report was
    reconciled (``foreign_domains.placed_here``), None when not known.
    """

    answer: StartupAnswer
    applied: bool
    placed: frozenset[str] | None = None


def check_sender(user_id: str | None, guid: str, routing_key: str = "") -> None:
    """Refuses a message an agent user sends for another host.

    Raises:
        Forbidden: ``user_id`` is missing, or is ``agent-<x>`` with ``x`` not
            ``guid``, or the routing key (``mgmt.<guid>.<Type>``) names another host.
    """
    words = routing_key.split(".")
    if len(words) >= 3 and words[0] == "mgmt" and words[1] != guid:
        raise Forbidden(f"message on routing key {routing_key} speaks for host {guid}; "
                        "an agent may only speak for itself")
    if user_id is None:
        # The broker validates user_id only when the sender sets it: without
        # it, nothing says who sent the message (docs/bus-contract.md).
        raise Forbidden(f"message for host {guid} carries no user_id; agents MUST set the "
                        "AMQP user_id property (hostdev's bus always does)")
    match = _AGENT_USER.match(user_id)
    if match and match["guid"] != guid:
        raise Forbidden(f"broker user {user_id} may not speak for host {guid}; each agent "
                        "connects as agent-<its guid>")


def guid_of(routing_key: str) -> str | None:
    """Returns the host guid of a ``mgmt.<guid>.<Type>`` routing key."""
    words = routing_key.split(".")
    return words[1] if len(words) >= 3 and words[0] == "mgmt" else None


class HostRegistry:
    """Keeps hosts, their inventory and their VMs' power states in step with the agents."""

    def __init__(self, config: MgmtConfig, lifecycle: VmLifecycleManager) -> None:
        self._config = config
        self._lifecycle = lifecycle

    def on_startup(self, tx: TxContext, command: StartupRoutingCommand) -> Registration:
        """Creates or updates the host, reconciles devices and VMs, answers StartupAnswer.

        A stale start-up (an announcement redelivered after a newer report of
        the same boot) still registers the host and is answered, but its
        domains change nothing.
        """
        now = utcnow()
        host = tx.session.scalar(select(Host).where(Host.guid == command.guid).with_for_update())
        previous = None
        if host is None:
            host = Host(guid=command.guid, status=HOST_UP, created_at=now)
            tx.session.add(host)
        else:
            previous = host.status
        host.name = command.name
        host.cpus = command.cpus
        host.memory_mb = command.memory_mb
        host.hypervisor_version = command.hypervisor_version
        host.migration_uri = command.migration_uri
        host.reset_on_release = command.pci_reset_on_release
        host.last_ping = now
        # Maintenance (and its preparation) is the operator's: a start-up keeps it.
        status: HostStatus = previous if previous in OPERATOR_STATUSES else HOST_UP
        host.status = status
        tx.session.flush()
        blocks.raise_host(tx.session.connection(), host.id)  # placeable, maybe with more room
        # A host created by this transaction is seen by no other: its first
        # inventory is one INSERT, without serializing or reading rows.
        changes = pci_inventory.reconcile_inventory(tx.session.connection(), host.id,
                                                  command.pci_devices,
                                                  new_host=previous is None)
        # Resets asked before and never answered (agent down, answer lost): again.
        cleaning.request_resets(tx, host, changes.cleaning)
        if previous != status:
            self._status_event(tx, host, status, previous)
        # The start-up snapshot races answers like a ping does (with several
        # daemons, or a redelivered start-up, it can be handled after a
        # StartAnswer it predates), so it is ordered the same way.
        stamp = Stamp.of(command)
        applied = report_order.admit(tx, host, stamp)
        stopped, placed = self._reconcile_power(tx, host, command.domains, stamp) \
            if applied else (0, None)
        log.info("host_registered", host=host.guid, name=host.name, host_id=host.id,
                 devices=len(command.pci_devices), added=len(changes.added),
                 renamed=len(changes.renamed), removed=len(changes.removed),
                 quarantined=len(changes.quarantined), vms_found_stopped=stopped)
        answer = StartupAnswer(host_id=host.id, ping_interval_s=self._config.ping_interval_s,
                               details=f"registered {host.name} with "
                                       f"{len(command.pci_devices)} PCI devices")
        return Registration(answer, applied, placed)

    def on_ping(self, tx: TxContext, command: PingRoutingCommand) -> bool:
        """Keeps the host Up and reconciles its VMs' power states; False if it was stale."""
        # Locked: reports of one host are admitted one after the other.
        host = tx.session.scalar(select(Host).where(Host.guid == command.guid)
                                 .with_for_update())
        if host is None:
            log.warning("ping_from_unknown_host", host=command.guid,
                        hint="the agent re-registers after its next reconnect")
            return False
        stamp = Stamp.of(command)
        if not report_order.admit(tx, host, stamp):
            return False
        previous = host.status
        host.last_ping = utcnow()
        if previous != HOST_UP and previous not in OPERATOR_STATUSES:
            host.status = HOST_UP
            tx.session.flush()
            blocks.raise_host(tx.session.connection(), host.id)
            self._status_event(tx, host, "Up", previous)
        self._reconcile_power(tx, host, command.domains, stamp)
        return True

    def on_vm_state_report(self, tx: TxContext, report: VmStateReport) -> str | None:
        """Follows a pushed power change: a Running VM found stopped becomes Stopped.

        Returns None when the report was stale (or its host unknown), else the
        state the reported VM had before the report ("" when there is no such VM).
        """
        stamp = Stamp.of(report)
        # Core statements: one is pushed at every VM start and stop. The VM's
        # state comes with the host: a VM that is not Running is not read again.
        admitted = report_order.admit_locked(tx, report.guid, stamp, report.vm_uuid)
        if admitted is None:
            return None
        host = admitted.host
        if report.state in ("stopped", "crashed") and admitted.vm_state == VM_RUNNING:
            vm = tx.session.scalar(select(VmInstance).where(VmInstance.uuid == report.vm_uuid,
                                                            VmInstance.host_id == host.id))
            if vm is not None and vm.state == VM_RUNNING \
                    and report_order.may_change(tx, vm, stamp):
                log.warning("vm_found_stopped", vm=vm.uuid, host=host.guid,
                            libvirt_event=report.event)
                self._lifecycle.transition(tx, vm, VmEvent.FOLLOW_AGENT_POWER_OFF)
        return admitted.vm_state or ""

    def _reconcile_power(self, tx: TxContext, host: Host, domains: Sequence[DomainInfo],
                         stamp: Stamp) -> tuple[int, frozenset[str] | None]:
        """Returns how many VMs were found stopped, and the VMs then placed on the host.

        A VM found stopped stays placed there (last placed); one adopted may
        not have been, so after an adoption the VMs placed are not known (None).
        """
        here = foreign_domains.placed_here(tx, host)
        placed = foreign_domains.placed_on(tx, host, here)
        foreign_domains.record(tx, host, domains, placed)
        reported = {d.uuid: d for d in domains
                    if d.state in ("running", "paused") and d.uuid in placed}
        running = set(reported)
        adopted = self._adopt_running(tx, host, reported, stamp)
        stopped = 0
        vms = tx.session.scalars(select(VmInstance).where(VmInstance.host_id == host.id,
                                                          VmInstance.state == VM_RUNNING))
        for vm in list(vms):
            if vm.uuid in running or not report_order.may_change(tx, vm, stamp):
                continue
            log.warning("vm_found_stopped", vm=vm.uuid, host=host.guid)
            self._lifecycle.transition(tx, vm, VmEvent.FOLLOW_AGENT_POWER_OFF)
            stopped += 1
        return stopped, (frozenset(here) if not adopted else None)

    def _adopt_running(self, tx: TxContext, host: Host, reported: dict[str, DomainInfo],
                       stamp: Stamp) -> int:
        """Follows a VM found running that management thought Stopped or in Error.

        Only a VM placed on this host (``reported`` holds no other): its
        domain holds real devices: they are allocated to it (never left on
        offer) and the VM becomes Running on this host. When one of them is
        held by another VM, nothing changes and the conflict is logged for the
        operator to settle (destroy the stray domain, or the other VM).
        Returns how many VMs it adopted.
        """
        if not reported:
            return 0
        adopted = 0
        vms = tx.session.scalars(select(VmInstance).where(
            VmInstance.uuid.in_(list(reported)), VmInstance.state.in_((VM_STOPPED, VM_ERROR))))
        for vm in list(vms):
            if not report_order.may_change(tx, vm, stamp):
                continue
            domain = reported[vm.uuid]
            adoption = pci_inventory.adopt_devices(tx.session.connection(), host.id, vm.id,
                                                   domain.hostdevs)
            if adoption.conflicts:
                log.error("vm_running_with_devices_of_others", vm=vm.uuid, vm_name=vm.name,
                          host=host.guid, conflicts=list(adoption.conflicts),
                          hint=f"the domain runs on {host.name} although management has it "
                               f"{vm.state}; destroy it there (virsh destroy {vm.name}) or "
                               "free the devices it holds")
                continue
            log.warning("vm_found_running", vm=vm.uuid, host=host.guid, previous=vm.state,
                        devices=[str(address) for address, _ in adoption.adopted])
            at = utcnow().isoformat() + "Z"
            for address, name in adoption.adopted:
                tx.outbox.add(f"pci.{host.guid}.Allocated",
                           PciDeviceAllocated(host_guid=host.guid, address=address, name=name,
                                              vm_uuid=vm.uuid, at=at))
            self._lifecycle.transition(tx, vm, VmEvent.FOLLOW_AGENT_POWER_ON,
                                       host_id=host.id)
            node = numa.node_of_held(tx.connection, vm.id, host.id)
            if node is not None and offering_numa_policy(tx, vm.offering_id) != "none":
                # As a claim under the policy records it: where the devices are.
                tx.session.execute(update(VmInstance).where(VmInstance.id == vm.id)
                                   .values(numa_node=node)
                                   .execution_options(synchronize_session=False))
            adopted += 1
        return adopted

    def _status_event(self, tx: TxContext, host: Host, status: HostStatus,
                      previous: HostStatus | None) -> None:
        announce_status(tx, host, status, previous)

    def sweep(self, tx: TxContext) -> int:
        """Marks silent hosts Disconnected, then Down; returns how many changed."""
        now = utcnow()
        disconnected_before = now - timedelta(seconds=self._config.host_disconnected_after_s)
        down_before = now - timedelta(seconds=self._config.host_down_after_s)
        changed = 0
        hosts = tx.session.scalars(select(Host).where(
            Host.status.in_((HOST_UP, HOST_DISCONNECTED)), Host.last_ping < disconnected_before))
        for host in list(hosts):
            status: HostStatus = HOST_DOWN if host.last_ping and host.last_ping < down_before \
                else HOST_DISCONNECTED
            if status == host.status:
                continue
            # Conditional on what we read: a ping that just arrived wins.
            result = tx.session.execute(
                update(Host).where(Host.id == host.id, Host.status == host.status,
                                   Host.last_ping == host.last_ping)
                .values(status=status).execution_options(synchronize_session=False))
            if result.rowcount == 1:  # type: ignore[attr-defined]
                self._status_event(tx, host, status, host.status)
                changed += 1
        return changed


def announce_status(tx: TxContext, host: Host, status: HostStatus,
                    previous: HostStatus | None) -> None:
    """Queues ``HostStatusChanged`` for a host that changed status, and logs it."""
    announce_status_of(tx, host.guid, status, previous)


def announce_status_of(tx: TxContext, guid: str, status: HostStatus,
                       previous: HostStatus | None) -> None:
    """Queues ``HostStatusChanged`` for host ``guid``, which changed status, and logs it."""
    tx.outbox.add(f"host.{guid}.{status}",
                  HostStatusChanged(host_guid=guid, status=status, previous=previous,
                                    at=utcnow().isoformat() + "Z"))
    log.info("host_status_changed", host=guid, status=status, previous=previous)
