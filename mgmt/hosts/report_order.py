"""Reports are applied in the order the agent took them, not in the order they arrive.

Every agent process has a random boot id and numbers its reports
(``StartupRoutingCommand``, ``PingRoutingCommand``, ``VmStateReport``) and its
answers in one sequence (``seq``). A report takes its number before it reads
libvirt and an answer after its work, so a report numbered below an answer
may have looked at libvirt before that answer's work was done.

- The host row keeps the boot id and number of its last applied report. A
  report of the same boot numbered no higher is stale: it is not applied at
  all (a broker backlog, a redelivery).
- A report of another boot means the agent restarted: its sequence starts
  over, the report is applied, and the boot it replaces is retired, so a late
  report of the retired boot is stale too.
- The VM row keeps the boot id and number of the last answer accepted for it
  (``hostdev.mgmt.jobs.engine``). A report of that boot numbered below it does
  not change the VM; the rest of the report still applies.
- A report without a boot id comes from an agent that numbers nothing: it is
  applied, and a VM whose last transition is younger than ``DRIFT_GRACE_S``
  is left alone, as those agents always were.

``hostdev_stale_reports_total{type, scope}`` counts what was not applied
(``scope`` ``host``: the whole report; ``vm``: one VM of it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple, Protocol, cast

import structlog
from prometheus_client import Counter
from sqlalchemy import Table, bindparam, select, update

from hostdev.messages.commands import PingRoutingCommand, StartupRoutingCommand, VmStateReport
from hostdev.mgmt.persistence.database import PreparedStatement
from hostdev.mgmt.persistence.models import Host, VmInstance, utcnow
from hostdev.mgmt.persistence.unit_of_work import TxContext

log = structlog.get_logger()

#: For agents that send no boot id only: a VM transition younger than this is
#: not overridden by their reports, which may have been taken before it.
DRIFT_GRACE_S = 5.0

STALE_REPORTS = Counter(
    "hostdev_stale_reports_total", "Reports not applied because the agent took them before "
    "what management already applied: the whole report (scope host) or one VM of it "
    "(scope vm).", ["type", "scope"])

Report = StartupRoutingCommand | PingRoutingCommand | VmStateReport


@dataclass(frozen=True)
class Stamp:
    """Where a report stands in its agent's sequence."""

    kind: str
    boot_id: str
    seq: int

    @classmethod
    def of(cls, report: Report) -> Stamp:
        """Returns the stamp a report carries."""
        return cls(type(report).__name__, report.boot_id, report.seq)

    @property
    def numbered(self) -> bool:
        """True when the agent numbers its reports (it sends a boot id)."""
        return bool(self.boot_id)


class ReportedHost(Protocol):
    """What :func:`admit` reads and writes of a host: a ``Host`` row, or its columns alone."""

    guid: str
    report_boot_id: str | None
    report_seq: int | None
    retired_boot_id: str | None


@dataclass(slots=True)
class HostReports:
    """A host's place in its agent's sequence, read without the ORM (a ``ReportedHost``)."""

    id: int
    guid: str
    report_boot_id: str | None
    report_seq: int | None
    retired_boot_id: str | None


class Admitted(NamedTuple):
    """A lifecycle report admitted: its host, and the state of the VM it names, as read
    with the host (None: no such VM)."""

    host: HostReports
    vm_state: str | None


_HOSTS = cast(Table, Host.__table__)
_VMS = cast(Table, VmInstance.__table__)
#: The host, locked, and the state of the reported VM (a subquery: not locked), in one
#: round trip.
_LOCK = PreparedStatement(select(
    _HOSTS.c.id, _HOSTS.c.guid, _HOSTS.c.report_boot_id, _HOSTS.c.report_seq,
    _HOSTS.c.retired_boot_id,
    select(_VMS.c.state).where(_VMS.c.uuid == bindparam("vm_uuid")).scalar_subquery())
    .where(_HOSTS.c.guid == bindparam("guid")).with_for_update())
_SAVE = PreparedStatement(update(_HOSTS).where(_HOSTS.c.id == bindparam("id")).values(
    report_boot_id=bindparam("boot_id"), report_seq=bindparam("seq"),
    retired_boot_id=bindparam("retired"), updated_at=bindparam("now")))


def admit_locked(tx: TxContext, guid: str, stamp: Stamp, vm_uuid: str) -> Admitted | None:
    """Locks host ``guid``'s row and admits a report of it (:func:`admit`), statements prepared.

    Returns the host and the state of VM ``vm_uuid`` (read in the same
    statement, so the report's handler needs no query for a VM it leaves
    alone), or None when the host is unknown or the report is stale. For
    reports that change nothing else on the host row (lifecycle reports).
    """
    rows = _LOCK.execute(tx.connection, {"guid": guid, "vm_uuid": vm_uuid}).rows
    if not rows:
        return None
    *columns, vm_state = rows[0]
    host = HostReports(*columns)
    if not admit(tx, host, stamp):
        return None
    _SAVE.execute(tx.connection, {"id": host.id, "boot_id": host.report_boot_id,
                                  "seq": host.report_seq, "retired": host.retired_boot_id,
                                  "now": utcnow()})
    return Admitted(host, vm_state)


def admit(tx: TxContext, host: ReportedHost, stamp: Stamp) -> bool:
    """Returns whether a report of ``host`` is newer than the last one applied.

    A newer report becomes the host's last applied one. The caller holds the
    host row locked, so two daemons never both admit reports of one host
    against the same last one.
    """
    if not stamp.numbered:
        return True
    if is_stale(host, stamp):
        if stamp.boot_id == host.report_boot_id:
            _stale(tx, stamp, "host", host=host.guid, last_seq=host.report_seq)
        else:
            _stale(tx, stamp, "host", host=host.guid,
                   why="a boot before the agent's last restart")
        return False
    if stamp.boot_id == host.report_boot_id:
        host.report_seq = stamp.seq
        return True
    if host.report_boot_id is not None:
        log.info("agent_boot_changed", host=host.guid, boot_id=stamp.boot_id,
                 previous=host.report_boot_id, report=stamp.kind,
                 hint="the agent restarted: its reports are numbered from 1 again")
    host.retired_boot_id = host.report_boot_id
    host.report_boot_id, host.report_seq = stamp.boot_id, stamp.seq
    return True


def is_stale(host: ReportedHost, stamp: Stamp) -> bool:
    """Returns whether a report of ``host`` is older than the last one applied
    (what :func:`admit` refuses), without changing or logging anything."""
    if not stamp.numbered:
        return False
    if stamp.boot_id == host.report_boot_id:
        return host.report_seq is not None and stamp.seq <= host.report_seq
    return stamp.boot_id == host.retired_boot_id


def may_change(tx: TxContext, vm: VmInstance, stamp: Stamp) -> bool:
    """Returns whether a report may change ``vm``: it is newer than the VM's last answer."""
    if not stamp.numbered:
        return vm.updated_at <= utcnow() - timedelta(seconds=DRIFT_GRACE_S)
    if vm.answer_boot_id == stamp.boot_id and vm.answer_seq is not None \
            and stamp.seq < vm.answer_seq:
        _stale(tx, stamp, "vm", vm=vm.uuid, answer_seq=vm.answer_seq)
        return False
    return True


def _stale(tx: TxContext, stamp: Stamp, scope: str, **why: object) -> None:
    log.info("report_not_applied", report=stamp.kind, scope=scope, boot_id=stamp.boot_id,
             seq=stamp.seq, hint="taken before what management already applied; a later "
                                 "report says how things are now", **why)
    kind = stamp.kind
    tx.after_commit.append(lambda: STALE_REPORTS.labels(kind, scope).inc())
