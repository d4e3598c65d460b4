"""Domains a host runs that management did not place there: recorded, never adopted.

A complete report (start-up, ping) lists every domain of a host. Management
follows there only the VMs it placed on that host (running there, or last
there and since Stopped or in Error) and the VMs migrating to or from it.
Any other domain is foreign: a uuid management does not know, or a VM of
another host (or a destroyed one) running or paused here. A shut-off
definition of a known VM is left alone: a VM that moved on leaves one behind.

The host row keeps the count and the first ``KEPT`` foreign domains (a JSON
list of ``[uuid, name]``), replaced at each complete report; a domain not
listed there before is logged and published as ``ForeignDomainFound``. The
inventory metrics count them per host and ``hostdev hosts`` shows the count.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import structlog
from sqlalchemy import and_, or_, select

from hostdev.messages.events import ForeignDomainFound
from hostdev.messages.values import DomainInfo
from hostdev.mgmt.jobs.payloads import migrations_of
from hostdev.mgmt.persistence.models import VM_DESTROYED, Host, VmInstance, utcnow
from hostdev.mgmt.persistence.unit_of_work import TxContext

log = structlog.get_logger()

#: Foreign domains kept by name on a host row (the count is always exact).
KEPT = 100
#: Libvirt states in which a known VM's domain on the wrong host matters.
_ACTIVE = ("running", "paused")


def placed_here(tx: TxContext, host: Host) -> set[str]:
    """Returns the uuids of the VMs placed on ``host`` (or last placed on it), not destroyed."""
    return set(tx.session.scalars(select(VmInstance.uuid).where(
        VmInstance.state != VM_DESTROYED,
        or_(VmInstance.host_id == host.id,
            and_(VmInstance.host_id.is_(None), VmInstance.last_host_id == host.id)))))


def placed_on(tx: TxContext, host: Host, here: set[str] | None = None) -> set[str]:
    """Returns the uuids of the VMs a report of ``host`` may change.

    The VMs placed on it (``here``, when the caller read them with
    :func:`placed_here`) and the VMs of running migrations from or to it.
    """
    placed = set(here) if here is not None else placed_here(tx, host)
    vm_ids = [m.vm_id for m in migrations_of(tx.session, host.guid) if m.vm_id is not None]
    if vm_ids:
        placed.update(tx.session.scalars(select(VmInstance.uuid)
                                         .where(VmInstance.id.in_(vm_ids))))
    return placed


def record(tx: TxContext, host: Host, domains: Sequence[DomainInfo],
           placed: set[str]) -> list[DomainInfo]:
    """Records the foreign domains of a complete report on ``host``; returns them."""
    others = [d for d in domains if d.uuid not in placed]
    known = set(tx.session.scalars(select(VmInstance.uuid).where(
        VmInstance.uuid.in_([d.uuid for d in others])))) if others else set()
    foreign = [d for d in others if d.uuid not in known or d.state in _ACTIVE]
    previous = {uuid for uuid, _ in names(host)}
    kept = foreign[:KEPT]
    host.foreign_domains = len(foreign)
    host.foreign_domain_names = json.dumps([[d.uuid, d.name] for d in kept]) if kept else None
    at = utcnow().isoformat() + "Z"
    for domain in kept:
        if domain.uuid in previous:
            continue
        log.warning("foreign_domain_found", host=host.guid, vm=domain.uuid,
                    vm_name=domain.name, state=domain.state,
                    hint="management did not place this domain on this host and will not "
                         "follow it; find out who started it")
        tx.outbox.add(f"host.{host.guid}.ForeignDomain",
                      ForeignDomainFound(host_guid=host.guid, vm_uuid=domain.uuid,
                                         name=domain.name, state=domain.state, at=at))
    return foreign


def names(host: Host) -> list[tuple[str, str]]:
    """Returns the (uuid, name) of the foreign domains kept on ``host``."""
    raw = json.loads(host.foreign_domain_names or "[]")
    return [(str(uuid), str(name)) for uuid, name in raw]
