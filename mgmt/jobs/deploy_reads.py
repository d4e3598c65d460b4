"""What a deploy reads before it places: its offering and whether its VM name is taken.

One statement for a deploy alone (the offering, its PCI requests and
template, and a live VM of the name). A run of deploys (``TxContext.ahead``:
the API requests the bus held, in one transaction) reads all of them at once
in two: the offerings they name and the live VMs of their names; each deploy
of the run takes its rows from ``TxContext.run_cache`` and a VM it creates
marks its name taken for the deploys after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from hostdev.messages.api import DeployVmRequest
from hostdev.messages.values import PciRequest
from hostdev.mgmt.errors import NotFound
from hostdev.mgmt.persistence.database import PreparedStatement
from hostdev.mgmt.persistence.models import (
    VM_DESTROYED,
    ServiceOffering,
    ServiceOfferingPciRequest,
    VmInstance,
)
from hostdev.mgmt.persistence.unit_of_work import TxContext

#: Deploys from this many in a run on are read ahead (two statements for the run).
READ_AHEAD_FROM = 3

_OFFERING = ServiceOffering.__table__.c
_REQUEST = ServiceOfferingPciRequest.__table__.c
_VM = VmInstance.__table__.c
_COLUMNS = (_OFFERING.id, _OFFERING.cpus, _OFFERING.memory_mb, _REQUEST.name, _REQUEST.count,
            _OFFERING.numa_policy, _OFFERING.template_name)
_WITH_REQUESTS = ServiceOffering.__table__.outerjoin(
    ServiceOfferingPciRequest.__table__, _REQUEST.offering_id == _OFFERING.id)
#: One round trip for a deploy: the offering, its PCI requests and template, and a live
#: VM of the name.
_FOR_DEPLOY = PreparedStatement(
    select(*_COLUMNS,
           select(_VM.uuid).where(_VM.name == bindparam("vm_name"), _VM.state != VM_DESTROYED)
           .limit(1).scalar_subquery())
    .select_from(_WITH_REQUESTS)
    .where(_OFFERING.name == bindparam("offering"))
    .order_by(_REQUEST.id))
#: A run's offerings, by name.
_OFFERINGS = (select(_OFFERING.name, *_COLUMNS).select_from(_WITH_REQUESTS)
              .where(_OFFERING.name.in_(bindparam("offerings", expanding=True)))
              .order_by(_OFFERING.id, _REQUEST.id))
#: The live VMs of a run's names.
_TAKEN = (select(_VM.name, _VM.uuid)
          .where(_VM.name.in_(bindparam("names", expanding=True)), _VM.state != VM_DESTROYED))
#: ``run_cache`` key of a run's ``_RunReads``.
_KEY = "deploy_reads"


@dataclass
class _RunReads:
    """What the deploys of a run read ahead.

    Attributes:
        offerings: offering name -> its rows (as ``_FOR_DEPLOY``'s, without the last column).
        names: the VM names read; ``taken`` holds those with a live VM (its uuid).
    """

    offerings: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)
    taken: dict[str, str] = field(default_factory=dict)


def read_for_deploy(tx: TxContext, offering_name: str,
                    vm_name: str) -> tuple[int, int, int, str | None]:
    """Returns an offering's id, CPUs and memory and a live VM called ``vm_name``, if any.

    Fills the transaction's caches of the offering's PCI requests, NUMA
    policy and template name on the way.

    Raises:
        NotFound: the offering does not exist; the text lists those that exist.
    """
    reads = _run_reads(tx)
    if reads is not None and vm_name in reads.names and offering_name in reads.offerings:
        taken = reads.taken.get(vm_name)
        rows = [(*row, taken) for row in reads.offerings[offering_name]]
    else:
        rows = _FOR_DEPLOY.execute(tx.connection,
                                   {"offering": offering_name, "vm_name": vm_name}).rows
    if not rows:
        raise no_such_offering(tx.session, offering_name)
    offering_id, cpus, memory_mb, _, _, numa_policy, template_name, taken = rows[0]
    requests = tuple(PciRequest(name=name, count=int(count))
                     for _, _, _, name, count, _, _, _ in rows if name is not None)
    tx.offering_requests[offering_id] = requests
    tx.offering_numa[offering_id] = numa_policy
    tx.offering_templates[offering_id] = template_name
    return offering_id, cpus, memory_mb, taken


def created(tx: TxContext, vm_name: str, vm_uuid: str) -> None:
    """Marks ``vm_name`` taken for the deploys after this one in the run."""
    reads: _RunReads | None = tx.run_cache.get(_KEY)
    if reads is not None:
        reads.names.add(vm_name)
        reads.taken[vm_name] = vm_uuid


def _run_reads(tx: TxContext) -> _RunReads | None:
    """Returns what the run's deploys read ahead (read now by the first), or None alone."""
    reads: _RunReads | None = tx.run_cache.get(_KEY)
    if reads is None:
        deploys = [message for message, _ in tx.ahead if isinstance(message, DeployVmRequest)]
        if len(deploys) < READ_AHEAD_FROM:
            return None
        reads = _RunReads(names={message.name for message in deploys})
        offerings = sorted({message.offering for message in deploys})
        for name, *row in tx.connection.execute(_OFFERINGS, {"offerings": offerings}):
            reads.offerings.setdefault(name, []).append(tuple(row))
        for name, uuid in tx.connection.execute(_TAKEN, {"names": sorted(reads.names)}):
            reads.taken[name] = uuid
        tx.run_cache[_KEY] = reads
    return reads


def no_such_offering(session: Session, name: str) -> NotFound:
    """Returns the refusal of offering ``name``, listing the offerings that exist."""
    names = ", ".join(session.scalars(select(ServiceOffering.name)
                                      .order_by(ServiceOffering.name))) or "none yet"
    return NotFound(f"no offering is named {name!r}; offerings: {names}")
