"""First-fit placement: one fit rule, as a paged SQL search and as per-host verdicts."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    ScalarSelect,
    bindparam,
    case,
    func,
    literal_column,
    select,
)
from sqlalchemy.orm import InstrumentedAttribute, Session

from hostdev.messages.values import HostStatus, HostVerdict, PciRequest
from hostdev.mgmt.api.offerings import describe_pci_requests
from hostdev.mgmt.devices.device_rows import FREE, UNAVAILABLE
from hostdev.mgmt.persistence.database import PreparedStatement
from hostdev.mgmt.persistence.models import HOST_UP, Host, PciDevice, VmInstance
from hostdev.mgmt.vms.vm_states import HOLDS_DEVICES


@dataclass(frozen=True)
class Demand:
    """What a VM needs from a host."""

    cpus: int
    memory_mb: int
    pci: tuple[PciRequest, ...] = ()


@dataclass(frozen=True)
class Unavailable:
    """The devices of one name a hardware rule keeps from offer on a host, and why."""

    count: int
    #: Their distinct reasons, most common first.
    reasons: tuple[str, ...] = ()

    def __str__(self) -> str:
        shown = "; ".join(self.reasons[:2]) + ("; ..." if len(self.reasons) > 2 else "")
        return f"{self.count} unavailable: {shown}" if shown else f"{self.count} unavailable"


@dataclass(frozen=True)
class HostCapacity:
    """One host's free resources, as ``explain`` reads them."""

    id: int
    guid: str
    name: str
    status: HostStatus
    free_cpus: int
    free_memory_mb: int
    free_devices: dict[str, int] = field(default_factory=dict)
    #: Per requested name, the devices the hardware rules keep (state ``unavailable``).
    unavailable: dict[str, Unavailable] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """A host the search found; the caller claims on it."""

    id: int
    guid: str
    name: str


#: The one host status placement offers; a host in any other is refused.
PLACEABLE: Final[HostStatus] = HOST_UP
#: Hosts with enough free devices of the first requested name read per page.
PAGE = 64

# The fit rule, criterion by criterion. A host fits a demand when:
#   1. it is in neither the avoid set's guids nor its names,
#   2. its status is PLACEABLE,
#   3. its CPUs minus those of its VMs in HOLDS_DEVICES states cover the demand's,
#   4. so does its memory,
#   5. it has at least ``count`` FREE devices of every requested name.
# ``_fit_conditions`` says it in SQL for the search, ``shortfalls`` in Python
# for verdicts and refusals; a property test holds the two to the same answers.
# The hardware rules (IOMMU groups, PF/VF, withheld devices) need no criterion
# of their own: a device they keep from offer is ``unavailable``, never FREE
# (``hostdev.mgmt.devices.availability``); verdicts say how many and why.


def find_hosts(session: Session, demand: Demand, *, avoid: Collection[str] = (),
               limit: int = 5) -> list[Candidate]:
    """Returns up to ``limit`` hosts that fit ``demand``, first fit (by host id).

    ``avoid`` holds host guids or names to leave out (hosts already tried,
    or named by the request).

    With PCI requests the search is ONE query: a derived table reads the
    free devices of the first requested name from the index
    ``(state, name, host_id)`` in host order, grouped per host with
    ``HAVING COUNT(*) >= n``, a page of ``PAGE`` hosts at most, so full hosts
    cost nothing; the outer query keeps the hosts that meet the rest of the
    fit rule. Only when a whole page is refused (Down hosts, no CPU) is the
    next page read; the answer holds the fitting hosts of the first page
    that has any. The caller claims on the first host in the same
    transaction; a lost race rolls back and the next host is tried in a new
    transaction.
    """
    if session.autoflush and (session.new or session.dirty or session.deleted):
        session.flush()  # as a query's autoflush would
    statement = _search_statement(len(demand.pci), len(avoid), limit)
    params: dict[str, object] = {"cpus": demand.cpus, "memory_mb": demand.memory_mb}
    for index, request in enumerate(demand.pci):
        params[f"name_{index}"] = request.name
        params[f"count_{index}"] = request.count
    for index, ref in enumerate(sorted(avoid)):
        params[f"avoid_{index}"] = ref
    after = 0
    while True:
        params["after"] = after
        rows = statement.execute(session.connection(), params).rows
        if rows or not demand.pci:
            return [Candidate(id=id_, guid=guid, name=name) for id_, guid, name in rows]
        first = demand.pci[0]
        page = (select(PciDevice.host_id.label("host_id"))
                .where(PciDevice.state == FREE, PciDevice.name == first.name,
                       PciDevice.host_id > after)
                .group_by(PciDevice.host_id).having(func.count() >= first.count)
                .order_by(PciDevice.host_id).limit(PAGE).subquery("page"))
        last = session.scalar(select(func.max(page.c.host_id)))
        count = session.scalar(select(func.count()).select_from(page))
        if last is None or (count or 0) < PAGE:
            return []
        after = int(last)


_SEARCHES: dict[tuple[int, int, int, int], PreparedStatement] = {}
#: The states holding CPU and memory, inlined (a prepared statement has no expanding IN).
_HOLDING: list[ColumnElement[str]] = [literal_column(f"'{state}'")
                                      for state in sorted(HOLDS_DEVICES)]


def _used_bound(column: InstrumentedAttribute[int]) -> ScalarSelect[int]:
    return (select(func.coalesce(func.sum(column), 0))
            .where(VmInstance.host_id == Host.id, VmInstance.state.in_(_HOLDING))
            .scalar_subquery())


def _fit_conditions(names: range, avoided: int) -> list[ColumnElement[bool]]:
    """Returns the fit rule over ``Host`` as SQL, for the requested names at ``names``.

    Parameters: ``cpus``, ``memory_mb``, ``name_<i>`` and ``count_<i>`` per
    index in ``names``, ``avoid_<i>`` per avoided guid or name.
    """
    conditions: list[ColumnElement[bool]] = []
    if avoided:
        refs: list[BindParameter[str]] = [bindparam(f"avoid_{index}")
                                          for index in range(avoided)]
        conditions += [Host.guid.not_in(refs), Host.name.not_in(refs)]
    conditions += [
        Host.status == PLACEABLE,
        Host.cpus - _used_bound(VmInstance.cpus) >= bindparam("cpus"),
        Host.memory_mb - _used_bound(VmInstance.memory_mb) >= bindparam("memory_mb"),
    ]
    for index in names:
        free = (select(func.count())
                .where(PciDevice.host_id == Host.id, PciDevice.name == bindparam(f"name_{index}"),
                       PciDevice.state == FREE)
                .scalar_subquery())
        conditions.append(free >= bindparam(f"count_{index}"))
    return conditions


def _search_statement(names: int, avoided: int, limit: int) -> PreparedStatement:
    """Returns ``find_hosts``' query (one page of it with PCI requests), prepared once per shape.

    Parameters: those of :func:`_fit_conditions`, and ``after`` (host id)
    with PCI requests.
    """
    key = (names, avoided, limit, PAGE)
    statement = _SEARCHES.get(key)
    if statement is not None:
        return statement
    query = select(Host.id, Host.guid, Host.name)
    if names:
        # The first name's count comes from the page itself.
        page = (select(PciDevice.host_id.label("host_id"))
                .where(PciDevice.state == FREE, PciDevice.name == bindparam("name_0"),
                       PciDevice.host_id > bindparam("after"))
                .group_by(PciDevice.host_id).having(func.count() >= bindparam("count_0"))
                .order_by(PciDevice.host_id).limit(PAGE).subquery("page"))
        query = query.join(page, page.c.host_id == Host.id)
    query = query.where(*_fit_conditions(range(1, names), avoided))
    statement = PreparedStatement(query.order_by(Host.id).limit(limit))
    _SEARCHES[key] = statement
    return statement


def read_capacities(session: Session, names: Sequence[str]) -> list[HostCapacity]:
    """Reads every host's status, free CPU/memory and free devices of ``names``."""
    used = (select(VmInstance.host_id.label("host_id"),
                   func.sum(VmInstance.cpus).label("cpus"),
                   func.sum(VmInstance.memory_mb).label("memory_mb"))
            .where(VmInstance.state.in_(HOLDS_DEVICES), VmInstance.host_id.is_not(None))
            .group_by(VmInstance.host_id).subquery())
    rows = session.execute(
        select(Host.id, Host.guid, Host.name, Host.status,
               (Host.cpus - func.coalesce(used.c.cpus, 0)).label("free_cpus"),
               (Host.memory_mb - func.coalesce(used.c.memory_mb, 0)).label("free_memory"))
        .outerjoin(used, used.c.host_id == Host.id).order_by(Host.id)).all()
    counts: dict[int, dict[str, int]] = {}
    if names:
        columns = [func.sum(case((PciDevice.name == name, 1), else_=0)).label(f"n{i}")
                   for i, name in enumerate(names)]
        grouped = session.execute(
            select(PciDevice.host_id, *columns)
            .where(PciDevice.state == FREE, PciDevice.name.in_(list(names)))
            .group_by(PciDevice.host_id))
        for row in grouped:
            counts[row[0]] = {name: int(row[i + 1] or 0) for i, name in enumerate(names)}
    kept = _read_unavailable(session, names)
    return [HostCapacity(id=r.id, guid=r.guid, name=r.name, status=r.status,
                         free_cpus=int(r.free_cpus), free_memory_mb=int(r.free_memory),
                         free_devices=counts.get(r.id, {}), unavailable=kept.get(r.id, {}))
            for r in rows]


def _read_unavailable(session: Session,
                      names: Sequence[str]) -> dict[int, dict[str, Unavailable]]:
    """Reads, per host and requested name, the unavailable devices and their reasons."""
    if not names:
        return {}
    found: dict[int, dict[str, list[tuple[int, str]]]] = {}
    for host_id, name, reason, number in session.execute(
            select(PciDevice.host_id, PciDevice.name, PciDevice.reason, func.count())
            .where(PciDevice.state == UNAVAILABLE, PciDevice.name.in_(list(names)))
            .group_by(PciDevice.host_id, PciDevice.name, PciDevice.reason)):
        found.setdefault(host_id, {}).setdefault(name, []).append((int(number), reason))
    return {host_id: {name: Unavailable(sum(n for n, _ in why), tuple(
                r for _, r in sorted(why, key=lambda item: (-item[0], item[1])) if r))
                      for name, why in by_name.items()}
            for host_id, by_name in found.items()}


@dataclass(frozen=True)
class Shortfall:
    """One criterion of the fit rule a host misses, with what was wanted and what it has."""

    criterion: Literal["avoided", "status", "cpus", "memory", "devices"]
    wanted: int = 0
    free: int = 0
    name: str = ""
    #: For ``devices``: those of the name the hardware rules keep from offer, if any.
    unavailable: Unavailable | None = None

    @property
    def kept(self) -> str:
        """`` (2 unavailable: why)`` when rules keep devices of the name, else ""."""
        return f" ({self.unavailable})" if self.unavailable else ""


def shortfalls(host: HostCapacity, demand: Demand,
               avoid: Collection[str] = ()) -> list[Shortfall]:
    """Returns every criterion of the fit rule ``host`` misses for ``demand`` (pure)."""
    missed: list[Shortfall] = []
    if host.guid in avoid or host.name in avoid:
        missed.append(Shortfall("avoided"))
    if host.status != PLACEABLE:
        missed.append(Shortfall("status"))
    if host.free_cpus < demand.cpus:
        missed.append(Shortfall("cpus", demand.cpus, host.free_cpus))
    if host.free_memory_mb < demand.memory_mb:
        missed.append(Shortfall("memory", demand.memory_mb, host.free_memory_mb))
    for request in demand.pci:
        free = host.free_devices.get(request.name, 0)
        if free < request.count:
            missed.append(Shortfall("devices", request.count, free, request.name,
                                    host.unavailable.get(request.name)))
    return missed


def _reason(host: HostCapacity, missed: Shortfall) -> str:
    match missed.criterion:
        case "avoided":
            return "in the avoid set"
        case "status":
            return f"is {host.status}"
        case "cpus":
            return f"needs {missed.wanted} CPUs, {missed.free} free"
        case "memory":
            return f"needs {missed.wanted} MiB, {missed.free} MiB free"
        case "devices":
            return f"needs {missed.wanted}x{missed.name}, {missed.free} free{missed.kept}"


def verdict(host: HostCapacity, demand: Demand, avoid: Collection[str] = ()) -> HostVerdict:
    """Says whether ``host`` can take ``demand`` and, if not, why (pure)."""
    reasons = [_reason(host, missed) for missed in shortfalls(host, demand, avoid)]
    return HostVerdict(host_guid=host.guid, host_name=host.name, accepted=not reasons,
                       reason="; ".join(reasons) if reasons else "fits")


def explain(session: Session, demand: Demand,
            avoid: Collection[str] = ()) -> list[HostVerdict]:
    """Returns a verdict per host, in first-fit order."""
    names = [request.name for request in demand.pci]
    return [verdict(host, demand, avoid) for host in read_capacities(session, names)]


def refusal(demand: Demand, hosts: Sequence[HostCapacity],
            avoid: Collection[str] = ()) -> str:
    """Writes why nothing fits: ``no host has 2 x 10GE free: h1 has 1, h2 is Down, h3 has 0``."""
    if not hosts:
        return "no host is registered: start a hostdev-agent first"
    wanted = describe_pci_requests(demand.pci) if demand.pci else "room"
    parts: list[str] = []
    for host in hosts:
        missed = shortfalls(host, demand, avoid)
        kinds = {m.criterion for m in missed}
        if "avoided" in kinds:
            parts.append(f"{host.name} is avoided")
        elif "status" in kinds:
            parts.append(f"{host.name} is {host.status}")
        else:
            detail = [f"has {m.free}" + ("" if len(demand.pci) == 1 else f" {m.name}") + m.kept
                      for m in missed if m.criterion == "devices"]
            detail += [f"has {m.free} CPUs free of {m.wanted} needed"
                       for m in missed if m.criterion == "cpus"]
            detail += [f"has {m.free} MiB free of {m.wanted} needed"
                       for m in missed if m.criterion == "memory"]
            parts.append(f"{host.name} " + (", ".join(detail) if detail else "fits now"))
    what = (f"{wanted} free" if demand.pci
            else f"{demand.cpus} CPUs and {demand.memory_mb} MiB free")
    return f"no host has {what}: " + ", ".join(parts)


