"""First-fit placement: one SQL query finds a host, the claim runs in the same transaction.

The search (``find_hosts``) is ONE query over Up hosts outside the avoid set,
with free CPU and memory for the offering and, for every requested name,
enough free devices (a count per host and name from the index
``(host_id, name, state)``). The caller claims on the first host in the same
transaction; a lost race (another daemon took a device between the query and
the claim) rolls back and the next host is tried in a NEW transaction.

``explain`` looks at every host with one grouped query and says, per host,
why it would be refused (``h3: needs 2 x 10GE, 1 free``); ``refusal`` turns
that into the error a person reads when nothing fits.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    ScalarSelect,
    Select,
    bindparam,
    case,
    func,
    literal_column,
    select,
)
from sqlalchemy.orm import InstrumentedAttribute, Session

from hostdev.messages.values import HostVerdict, PciRequest
from hostdev.mgmt.api.offerings import describe_pci_requests
from hostdev.mgmt.persistence.database import PreparedStatement
from hostdev.mgmt.persistence.models import Host, PciDevice, VmInstance
from hostdev.mgmt.vms.vm_states import HOLDS_DEVICES


@dataclass(frozen=True)
class Demand:
    """What a VM needs from a host."""

    cpus: int
    memory_mb: int
    pci: tuple[PciRequest, ...] = ()


@dataclass(frozen=True)
class HostCapacity:
    """One host's free resources, as ``explain`` reads them."""

    id: int
    guid: str
    name: str
    status: str
    free_cpus: int
    free_memory_mb: int
    free_devices: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """A host the search found; the caller claims on it."""

    id: int
    guid: str
    name: str


def _used(column: object, host_id: object) -> object:
    return (select(func.coalesce(func.sum(column), 0))
            .where(VmInstance.host_id == host_id, VmInstance.state.in_(HOLDS_DEVICES))
            .scalar_subquery())


#: Hosts with enough free devices of the first requested name read per page.
PAGE = 64


def _host_filters(query: Select[int, str, str], demand: Demand,
                  avoid: Collection[str]) -> Select[int, str, str]:
    query = (query.where(Host.status == "Up")
             .where(Host.cpus - _used(VmInstance.cpus, Host.id) >= demand.cpus)
             .where(Host.memory_mb - _used(VmInstance.memory_mb, Host.id) >= demand.memory_mb))
    for request in demand.pci[1:]:
        free = (select(func.count())
                .where(PciDevice.host_id == Host.id, PciDevice.name == request.name,
                       PciDevice.state == "free")
                .scalar_subquery())
        query = query.where(free >= request.count)
    if avoid:
        query = query.where(Host.guid.not_in(list(avoid)), Host.name.not_in(list(avoid)))
    return query


def find_hosts(session: Session, demand: Demand, *, avoid: Collection[str] = (),
               limit: int = 5) -> list[Candidate]:
    """Returns up to ``limit`` hosts that fit ``demand``, first fit (by host id).

    ``avoid`` holds host guids or names to leave out (hosts already tried,
    or named by the request).

    With PCI requests the search is ONE query: a derived table reads the
    free devices of the first requested name from the index
    ``(state, name, host_id)`` in host order, grouped per host with
    ``HAVING COUNT(*) >= n``, a page of ``PAGE`` hosts at most, so full hosts
    cost nothing; the outer query keeps Up hosts with free CPU and memory and
    enough free devices of every other name. Only when a whole page is
    refused (Down hosts, no CPU) is the next page read.
    """
    if not demand.pci:
        query = _host_filters(select(Host.id, Host.guid, Host.name), demand, avoid)
        return [Candidate(id=row.id, guid=row.guid, name=row.name)
                for row in session.execute(query.order_by(Host.id).limit(limit))]
    if session.autoflush and (session.new or session.dirty or session.deleted):
        session.flush()  # as a query's autoflush would
    first = demand.pci[0]
    statement = _page_statement(len(demand.pci), len(avoid), limit)
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
        if rows:
            return [Candidate(id=id_, guid=guid, name=name) for id_, guid, name in rows]
        page = (select(PciDevice.host_id.label("host_id"))
                .where(PciDevice.state == "free", PciDevice.name == first.name,
                       PciDevice.host_id > after)
                .group_by(PciDevice.host_id).having(func.count() >= first.count)
                .order_by(PciDevice.host_id).limit(PAGE).subquery("page"))
        last = session.scalar(select(func.max(page.c.host_id)))
        count = session.scalar(select(func.count()).select_from(page))
        if last is None or (count or 0) < PAGE:
            return []
        after = int(last)


_PAGES: dict[tuple[int, int, int], PreparedStatement] = {}
#: The states holding CPU and memory, inlined (a prepared statement has no expanding IN).
_HOLDING: list[ColumnElement[str]] = [literal_column(f"'{state}'")
                                      for state in sorted(HOLDS_DEVICES)]


def _used_bound(column: InstrumentedAttribute[int]) -> ScalarSelect[int]:
    return (select(func.coalesce(func.sum(column), 0))
            .where(VmInstance.host_id == Host.id, VmInstance.state.in_(_HOLDING))
            .scalar_subquery())


def _page_statement(names: int, avoided: int, limit: int) -> PreparedStatement:
    """Returns ``find_hosts``' query for one page, prepared once per shape.

    Parameters: ``after`` (host id), ``cpus``, ``memory_mb``, ``name_<i>`` and
    ``count_<i>`` per requested name, ``avoid_<i>`` per avoided guid or name.
    """
    key = (names, avoided, limit)
    statement = _PAGES.get(key)
    if statement is not None:
        return statement
    page = (select(PciDevice.host_id.label("host_id"))
            .where(PciDevice.state == "free", PciDevice.name == bindparam("name_0"),
                   PciDevice.host_id > bindparam("after"))
            .group_by(PciDevice.host_id).having(func.count() >= bindparam("count_0"))
            .order_by(PciDevice.host_id).limit(PAGE).subquery("page"))
    query = (select(Host.id, Host.guid, Host.name).join(page, page.c.host_id == Host.id)
             .where(Host.status == "Up")
             .where(Host.cpus - _used_bound(VmInstance.cpus) >= bindparam("cpus"))
             .where(Host.memory_mb - _used_bound(VmInstance.memory_mb)
                    >= bindparam("memory_mb")))
    for index in range(1, names):
        free = (select(func.count())
                .where(PciDevice.host_id == Host.id, PciDevice.name == bindparam(f"name_{index}"),
                       PciDevice.state == "free")
                .scalar_subquery())
        query = query.where(free >= bindparam(f"count_{index}"))
    if avoided:
        refs: list[BindParameter[str]] = [bindparam(f"avoid_{index}")
                                          for index in range(avoided)]
        query = query.where(Host.guid.not_in(refs), Host.name.not_in(refs))
    statement = PreparedStatement(query.order_by(Host.id).limit(limit))
    _PAGES[key] = statement
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
            .where(PciDevice.state == "free", PciDevice.name.in_(list(names)))
            .group_by(PciDevice.host_id))
        for row in grouped:
            counts[row[0]] = {name: int(row[i + 1] or 0) for i, name in enumerate(names)}
    return [HostCapacity(id=r.id, guid=r.guid, name=r.name, status=r.status,
                         free_cpus=int(r.free_cpus), free_memory_mb=int(r.free_memory),
                         free_devices=counts.get(r.id, {}))
            for r in rows]


def verdict(host: HostCapacity, demand: Demand, avoid: Collection[str] = ()) -> HostVerdict:
    """Says whether ``host`` can take ``demand`` and, if not, why (pure)."""
    reasons: list[str] = []
    if host.guid in avoid or host.name in avoid:
        reasons.append("in the avoid set")
    if host.status != "Up":
        reasons.append(f"is {host.status}")
    if host.free_cpus < demand.cpus:
        reasons.append(f"needs {demand.cpus} CPUs, {host.free_cpus} free")
    if host.free_memory_mb < demand.memory_mb:
        reasons.append(f"needs {demand.memory_mb} MiB, {host.free_memory_mb} MiB free")
    for request in demand.pci:
        free = host.free_devices.get(request.name, 0)
        if free < request.count:
            reasons.append(f"needs {request.count}x{request.name}, {free} free")
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
        if host.guid in avoid or host.name in avoid:
            parts.append(f"{host.name} is avoided")
        elif host.status != "Up":
            parts.append(f"{host.name} is {host.status}")
        else:
            short = [r for r in demand.pci if host.free_devices.get(r.name, 0) < r.count]
            detail = [f"has {host.free_devices.get(r.name, 0)}"
                      + ("" if len(demand.pci) == 1 else f" {r.name}") for r in short]
            if host.free_cpus < demand.cpus:
                detail.append(f"has {host.free_cpus} CPUs free of {demand.cpus} needed")
            if host.free_memory_mb < demand.memory_mb:
                detail.append(f"has {host.free_memory_mb} MiB free of {demand.memory_mb} "
                              "needed")
            parts.append(f"{host.name} " + (", ".join(detail) if detail else "fits now"))
    what = (f"{wanted} free" if demand.pci
            else f"{demand.cpus} CPUs and {demand.memory_mb} MiB free")
    return f"no host has {what}: " + ", ".join(parts)


