"""Known hosts announcing themselves again, in batches, when nothing of theirs changed.

After a broker restart every agent reconnects and announces itself again
(and after an agents' upgrade every agent restarts): thousands of start-ups
of KNOWN hosts at once. Alone, each is a transaction that locks and reads
its host's devices and VMs and writes back what did not change. Here the
known hosts of a run whose start-up would change nothing but the host row
are taken together, in the run's one transaction, in a fixed number of
reads whatever the run's size plus one UPDATE per host:

1. the run's hosts, locked (one read);
2. their devices (one read): the inventory reported must be the one stored,
   fact for fact, with no device cleaning (its reset is asked again alone),
   removed or quarantined, so reconciling it would write nothing;
3. their VMs (one read, as a batch of pings): the domains reported must be
   those last reconciled (the digest a ping compares) with no Running VM
   missing and no Stopped one running, so reconciling them would change
   nothing.

Each such host's row then takes what a start-up alone writes (name, size,
hypervisor, migration URI, its place in the agent's report sequence,
``last_ping``, Up unless in maintenance) and a ``HostStatusChanged`` event
when its status changes; it is logged and answered as alone. A host with
device rules qualifies when its rows already follow them (the rules read
over its devices and their holders, one read for the run, change nothing),
as the start-up alone would find. Any other start-up of a known host is
handed back and registered alone: one a running migration names, a stale
announcement, or one whose devices, domains or rule states would change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

import structlog
from sqlalchemy import Table, bindparam, select, update

from hostdev.messages.bus.contract import Incoming
from hostdev.messages.codec import domains_digest
from hostdev.messages.commands import StartupAnswer, StartupRoutingCommand
from hostdev.messages.runtime.logging import bound_message
from hostdev.messages.values import HostStatus
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.devices import host_rules, pci_inventory
from hostdev.mgmt.devices.availability import RuleChanges, rule_changes
from hostdev.mgmt.devices.device_rows import CLEANING, DEVICES, address_of
from hostdev.mgmt.errors import InvalidRequest
from hostdev.mgmt.hosts import report_order
from hostdev.mgmt.hosts.pings import HostRow, lock_hosts, placed_vms, report_unchanged
from hostdev.mgmt.hosts.registration import announce_status_of
from hostdev.mgmt.hosts.report_order import Stamp
from hostdev.mgmt.persistence.models import HOST_UP, OPERATOR_STATUSES, Host, utcnow
from hostdev.mgmt.persistence.unit_of_work import TxContext
from hostdev.mgmt.placement import blocks

log = structlog.get_logger()

_HOSTS: Final = cast(Table, Host.__table__)
_DEVICES_OF: Final = select(DEVICES).where(
    DEVICES.c.host_id.in_(bindparam("host_ids", expanding=True)))
_ANNOUNCED: Final = update(_HOSTS).where(_HOSTS.c.id == bindparam("host_id")).values(
    name=bindparam("name"), cpus=bindparam("cpus"), memory_mb=bindparam("memory_mb"),
    hypervisor_version=bindparam("hypervisor_version"),
    migration_uri=bindparam("migration_uri"), reset_on_release=bindparam("reset_on_release"),
    status=bindparam("status"), last_ping=bindparam("now"), updated_at=bindparam("now"),
    report_boot_id=bindparam("report_boot_id"), report_seq=bindparam("report_seq"),
    retired_boot_id=bindparam("retired_boot_id"),
    # As an inventory reconciled alone does (``host_rules.serialize_always``).
    device_epoch=_HOSTS.c.device_epoch + 1)


def take_restarts(tx: TxContext, config: MgmtConfig,
                  startups: Mapping[int, tuple[StartupRoutingCommand, Incoming]],
                  ) -> dict[int, StartupAnswer]:
    """Registers again the known hosts whose start-up changes nothing but their row.

    ``startups`` are a run's start-ups of known hosts by position, each host
    once and in no migration. Returns the answer of each taken, by position.
    """
    guids = {startup.guid: index for index, (startup, _) in startups.items()}
    hosts = lock_hosts(tx, sorted(guids))
    candidates = {guid: host for guid, host in hosts.items()
                  if host.reconciled_digest is not None
                  and not report_order.is_stale(host, Stamp.of(startups[guids[guid]][0]))}
    if not candidates:
        return {}
    ids = [host.id for host in candidates.values()]
    stored: dict[int, list[Any]] = {host_id: [] for host_id in ids}
    for row in tx.connection.execute(_DEVICES_OF, {"host_ids": ids}):
        stored[row.host_id].append(row)
    placed = placed_vms(tx, ids)
    ruled = host_rules.read_facts_of(
        tx.connection, [host.id for host in candidates.values() if host.device_rules])
    answers: dict[int, StartupAnswer] = {}
    up: list[tuple[int, int, int]] = []  # (id, free CPUs, free memory) of those taken Up
    for guid, host in candidates.items():
        index = guids[guid]
        startup, incoming = startups[index]
        if not _inventory_unchanged(startup, stored[host.id]) or not report_unchanged(
                domains_digest(startup.domains), startup.domains, host.reconciled_digest,
                placed[host.id]):
            continue
        if host.id in ruled and rule_changes(ruled[host.id]) != RuleChanges():
            continue  # its devices do not follow the rules: the full path applies them
        # Its log lines name its message, as the pipeline binds them for one alone.
        with bound_message(incoming.message_id, incoming.correlation_id, host=guid, vm=None):
            answers[index] = _announced(tx, config, startup, host)
        if host.status not in OPERATOR_STATUSES:  # Up again, perhaps with more room
            up.append((host.id, startup.cpus - host.used_cpus,
                       startup.memory_mb - host.used_memory_mb))
    blocks.raise_rows(tx.connection, up)  # placement's blocks
    return answers


def _inventory_unchanged(startup: StartupRoutingCommand, rows: Sequence[Any]) -> bool:
    """Tells whether reconciling the reported inventory against ``rows`` would write nothing."""
    try:
        reported = pci_inventory.index_reported(f"host {startup.guid}", startup.pci_devices)
    except InvalidRequest:  # an address twice: refused alone, with the reason
        return False
    if not rows or len(rows) != len(reported):
        return False
    for row in rows:
        info = reported.get(address_of(row))
        if info is None or row.state == CLEANING or pci_inventory.changes_row(row, info):
            return False
    return True


def _announced(tx: TxContext, config: MgmtConfig, startup: StartupRoutingCommand,
               host: HostRow) -> StartupAnswer:
    """Writes what a start-up alone writes on an unchanged known host; returns its answer."""
    previous = host.status
    status: HostStatus = previous if previous in OPERATOR_STATUSES else HOST_UP
    if previous != status:
        announce_status_of(tx, startup.guid, status, previous)
    report_order.admit(tx, host, Stamp.of(startup))  # not stale: checked above
    tx.connection.execute(_ANNOUNCED, {
        "host_id": host.id, "name": startup.name, "cpus": startup.cpus,
        "memory_mb": startup.memory_mb, "hypervisor_version": startup.hypervisor_version,
        "migration_uri": startup.migration_uri,
        "reset_on_release": startup.pci_reset_on_release, "status": status, "now": utcnow(),
        "report_boot_id": host.report_boot_id, "report_seq": host.report_seq,
        "retired_boot_id": host.retired_boot_id})
    devices = len(startup.pci_devices)
    log.info("host_registered", host=startup.guid, name=startup.name, host_id=host.id,
             devices=devices, added=0, renamed=0, removed=0, quarantined=0,
             vms_found_stopped=0)
    return StartupAnswer(host_id=host.id, ping_interval_s=config.ping_interval_s,
                         details=f"registered {startup.name} with {devices} PCI devices")
