"""Pings in batches: one transaction for a run of pings, reconciling only what changed.

Ten thousand agents pinging every 30 s are 333 pings a second, nearly all
saying what the last one said. The bus hands the pings it holds over as one
run (``contract.Batching``) and :meth:`PingManager.on_pings` takes them in ONE
transaction, with prepared statements:

1. the hosts of the run, locked (reports of one host are admitted one after
   the other, as ``HostRegistry.on_ping`` does);
2. the hosts that running migrations involve (one read of the running
   migrate jobs for the run, none per ping);
3. the VMs placed on those hosts (one query);
4. ONE ``UPDATE`` of ``last_ping`` (and each host's report number) for them all.

A ping is taken there only when there is nothing to reconcile: its host is
known and Up (or in maintenance), in no running migration, pinged once in the
run, and the ping's ``domains_digest`` and the VMs placed on the host are those
of the host's last reconciled ping (``hosts.reconciled_digest``), and agree
(no VM Running here that the report lacks, none Stopped or in Error that it
shows running). Every other ping is handed back and handled alone by
:meth:`PingManager.on_ping`, in its own transaction, as before batching: full
reconciliation, then the digest is remembered for the next ping (a start-up
remembers the digest of the domains it reconciled, so a host's first ping
after it is taken in a batch too). A stale ping (``report_order``) changes
nothing either way.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import cast

from sqlalchemy import ClauseElement, Table, and_, bindparam, case, or_, select, update

from hostdev.messages.bus.contract import Incoming
from hostdev.messages.codec import domains_digest
from hostdev.messages.commands import PingRoutingCommand, StartupRoutingCommand
from hostdev.messages.values import DomainInfo, HostStatus
from hostdev.mgmt.hosts import report_order
from hostdev.mgmt.hosts.registration import HostRegistry
from hostdev.mgmt.hosts.report_order import HostReports, Stamp
from hostdev.mgmt.jobs.migration_recovery import MigrationRecovery
from hostdev.mgmt.jobs.payloads import migrating_hosts
from hostdev.mgmt.persistence.database import PreparedStatement
from hostdev.mgmt.persistence.models import (
    HOST_UP,
    OPERATOR_STATUSES,
    VM_DESTROYED,
    VM_ERROR,
    VM_RUNNING,
    VM_STOPPED,
    Host,
    VmInstance,
    utcnow,
)
from hostdev.mgmt.persistence.unit_of_work import TxContext

#: How long a ping waits for others to share its transaction (pings come every
#: 30 s or so: a tenth of a second more is nothing, and fills runs at low rates).
PING_LINGER_S = 0.1
#: Host statuses a ping leaves as they are (any other becomes Up, with an event),
#: as ``HostRegistry.on_ping`` decides.
_STEADY: tuple[HostStatus, ...] = (HOST_UP, *OPERATOR_STATUSES)
#: Libvirt states in which a domain counts as running.
_ACTIVE = ("running", "paused")
_HOSTS = cast(Table, Host.__table__)
_VMS = cast(Table, VmInstance.__table__)


@dataclass(slots=True)
class HostRow(HostReports):
    """The columns of a host a ping or a start-up batch reads: its report order,
    status, last digest, whether its devices have rules, and what its VMs hold."""

    status: HostStatus
    reconciled_digest: str | None
    device_rules: bool
    used_cpus: int
    used_memory_mb: int


@dataclass(slots=True)
class Placed:
    """The VMs placed on one host (``foreign_domains.placed_on`` without migrations)."""

    uuids: list[str] = field(default_factory=list)
    running: set[str] = field(default_factory=set)
    stopped: set[str] = field(default_factory=set)


class _BySize:
    """One prepared statement per number of rows it names (no expanding ``IN``)."""

    def __init__(self, build: Callable[[int], ClauseElement]) -> None:
        self._build = build
        self._made: dict[int, PreparedStatement] = {}

    def __call__(self, size: int) -> PreparedStatement:
        made = self._made.get(size)
        if made is None:
            made = self._made[size] = PreparedStatement(self._build(size))
        return made


def _ids(size: int, prefix: str = "i") -> list[ClauseElement]:
    return [bindparam(f"{prefix}{k}") for k in range(size)]


_LOCK_HOSTS = _BySize(lambda size: select(
    _HOSTS.c.id, _HOSTS.c.guid, _HOSTS.c.report_boot_id, _HOSTS.c.report_seq,
    _HOSTS.c.retired_boot_id, _HOSTS.c.status, _HOSTS.c.reconciled_digest,
    _HOSTS.c.device_rules, _HOSTS.c.used_cpus, _HOSTS.c.used_memory_mb,
).where(_HOSTS.c.guid.in_(_ids(size, "g"))).with_for_update())


def lock_hosts(tx: TxContext, guids: Sequence[str]) -> dict[str, HostRow]:
    """Locks the rows of the hosts of these guids (those that exist) in one read, by guid."""
    rows = _LOCK_HOSTS(len(guids)).execute(
        tx.connection, {f"g{k}": guid for k, guid in enumerate(guids)}).rows
    return {row[1]: HostRow(*row) for row in rows}

_PLACED_VMS = _BySize(lambda size: select(
    _VMS.c.host_id, _VMS.c.last_host_id, _VMS.c.uuid, _VMS.c.state,
).where(_VMS.c.state != VM_DESTROYED,
        or_(_VMS.c.host_id.in_(_ids(size)),
            and_(_VMS.c.host_id.is_(None), _VMS.c.last_host_id.in_(_ids(size))))))


def _touch(size: int) -> ClauseElement:
    ids = _ids(size)
    now = bindparam("now", type_=_HOSTS.c.last_ping.type)
    seq = case(*[(_HOSTS.c.id == ids[k], bindparam(f"s{k}")) for k in range(size)],
               else_=_HOSTS.c.report_seq)
    return update(_HOSTS).where(_HOSTS.c.id.in_(ids)).values(
        last_ping=now, updated_at=now, report_seq=seq)


_TOUCH_HOSTS = _BySize(_touch)

_HOST_ID = PreparedStatement(select(_HOSTS.c.id).where(_HOSTS.c.guid == bindparam("guid")))
_REMEMBER = PreparedStatement(update(_HOSTS).where(_HOSTS.c.id == bindparam("id")).values(
    reconciled_digest=bindparam("digest"), updated_at=bindparam("now")))


def reconciled_digest(domains_digest: str, placed: Sequence[str]) -> str | None:
    """Returns what a reconciled ping leaves on its host: the report's and the VMs' digest.

    None when the agent sends no digest: its every ping is reconciled.
    """
    if not domains_digest:
        return None
    text = domains_digest + "|" + ",".join(sorted(placed))
    return hashlib.sha256(text.encode()).hexdigest()


class PingManager:
    """Takes pings, in batches where nothing changed and one by one where something did."""

    def __init__(self, registry: HostRegistry, recovery: MigrationRecovery) -> None:
        self._registry = registry
        self._recovery = recovery

    def on_ping(self, tx: TxContext, ping: PingRoutingCommand, _incoming: Incoming) -> None:
        """Keeps the host Up, reconciles its VMs and migrations, remembers what it saw."""
        if not self._registry.on_ping(tx, ping):
            return  # stale, or an unknown host: it settles nothing
        self._recovery.on_host_report(tx, ping.guid, ping.domains, complete=True)
        host_id = _HOST_ID.execute(tx.connection, {"guid": ping.guid}).rows[0][0]
        _remember(tx, host_id, ping.domains_digest)

    @staticmethod
    def on_startup(tx: TxContext, startup: StartupRoutingCommand, host_id: int,
                   applied: bool, placed: Collection[str] | None = None) -> None:
        """Remembers the domains a start-up reconciled (none if stale): the same ping is not.

        The digest is the one an agent sends (``codec.domains_digest``), of the
        start-up's domains as decoded; ``placed``, the VMs placed on the host
        as the start-up left them, when the caller knows them (else they are read).
        """
        _remember(tx, host_id, domains_digest(startup.domains) if applied else "", placed)

    def on_pings(self, tx: TxContext,
                 pings: Sequence[tuple[PingRoutingCommand, Incoming]]) -> list[bool]:
        """Takes the pings with nothing to reconcile; False for each to handle alone."""
        times = Counter(ping.guid for ping, _ in pings)
        guids = list(times)
        hosts = lock_hosts(tx, guids)
        migrating = migrating_hosts(tx.connection) if hosts else set()
        candidates = [h.id for h in hosts.values()
                      if h.status in _STEADY and h.reconciled_digest is not None
                      and h.guid not in migrating and times[h.guid] == 1]
        placed = placed_vms(tx, candidates) if candidates else {}
        taken: list[bool] = []
        touched: dict[int, int | None] = {}
        for ping, _ in pings:
            host = hosts.get(ping.guid)
            stamp = Stamp.of(ping)
            if host is None or host.id not in placed \
                    or (stamp.numbered and stamp.boot_id != host.report_boot_id) \
                    or not _unchanged(ping, host, placed[host.id]):
                taken.append(False)  # reconciled alone (a restarted agent's ping too)
                continue
            taken.append(True)
            if report_order.admit(tx, host, stamp):
                touched[host.id] = host.report_seq
        if touched:
            params: dict[str, object] = {"now": utcnow()}
            for k, (host_id, seq) in enumerate(touched.items()):
                params[f"i{k}"], params[f"s{k}"] = host_id, seq
            _TOUCH_HOSTS(len(touched)).execute(tx.connection, params)
        return taken


def _remember(tx: TxContext, host_id: int, digest: str,
              placed: Collection[str] | None = None) -> None:
    if not digest:
        remembered = None  # what reconciled_digest says without reading the VMs
    else:
        uuids = list(placed) if placed is not None else placed_vms(tx, [host_id])[host_id].uuids
        remembered = reconciled_digest(digest, uuids)
    _REMEMBER.execute(tx.connection, {"id": host_id, "now": utcnow(), "digest": remembered})


def placed_vms(tx: TxContext, host_ids: Sequence[int]) -> dict[int, Placed]:
    """Returns the VMs placed on each host, in one query."""
    placed: dict[int, Placed] = {host_id: Placed() for host_id in host_ids}
    rows = _PLACED_VMS(len(host_ids)).execute(
        tx.connection, {f"i{k}": host_id for k, host_id in enumerate(host_ids)}).rows
    for host_id, last_host_id, uuid, state in rows:
        mine = placed.get(host_id if host_id is not None else last_host_id)
        if mine is None:
            continue
        mine.uuids.append(uuid)
        if state == VM_RUNNING and host_id is not None:
            mine.running.add(uuid)
        elif state in (VM_STOPPED, VM_ERROR):
            mine.stopped.add(uuid)
    return placed


def _unchanged(ping: PingRoutingCommand, host: HostRow, placed: Placed) -> bool:
    """Tells whether reconciling the ping would change nothing (see the module docstring)."""
    return report_unchanged(ping.domains_digest, ping.domains, host.reconciled_digest, placed)


def report_unchanged(digest: str, domains: Sequence[DomainInfo], remembered: str | None,
                     placed: Placed) -> bool:
    """Tells whether reconciling a host's full domain report (of digest ``digest``)
    would change nothing: the host's last reconciled digest is ``remembered``."""
    if reconciled_digest(digest, placed.uuids) != remembered:
        return False
    active = {d.uuid for d in domains if d.state in _ACTIVE}
    return placed.running <= active and not placed.stopped & active

