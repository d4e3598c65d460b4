"""First-fit placement: one fit rule, as a paged SQL search and as per-host verdicts."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    ScalarSelect,
    Subquery,
    and_,
    bindparam,
    case,
    func,
    literal_column,
    select,
)
from sqlalchemy.orm import InstrumentedAttribute, Session

from hostdev.messages.values import HostStatus, HostVerdict, NumaPolicy, PciRequest
from hostdev.mgmt.api.offerings import describe_pci_requests
from hostdev.mgmt.devices.device_rows import FREE, NO_NODE, NUMA_NODE
from hostdev.mgmt.persistence.database import PreparedStatement
from hostdev.mgmt.persistence.models import HOST_UP, Host, PciDevice, VmInstance

# Verdicts and refusals quote it; callers take it from here.
from hostdev.mgmt.placement.unavailable import Unavailable as Unavailable
from hostdev.mgmt.placement.unavailable import read_unavailable
from hostdev.mgmt.vms.vm_states import HOLDS_DEVICES


@dataclass(frozen=True)
class Demand:
    """What a VM needs from a host."""

    cpus: int
    memory_mb: int
    pci: tuple[PciRequest, ...] = ()
    #: ``required``: every device on one NUMA node of the host, or the host is refused.
    numa: NumaPolicy = "none"


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
    #: NUMA node (``NO_NODE`` for devices without one) -> name -> free devices.
    free_by_node: dict[int, dict[str, int]] = field(default_factory=dict)
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
#: Hosts with enough free devices of the first requested name read in the first page.
PAGE = 64
#: Each refused page makes the next this many times larger, up to ``PAGE_MAX`` hosts.
PAGE_GROWTH = 4
PAGE_MAX = 4096
#: The device index a page reads as a range (``state, name, host_id``). MariaDB
#: left to itself reads it as ``ref`` on (state, name) and filters ``host_id >
#: after``: each page then costs every row before it (docs/database.md).
_PAGE_INDEX = "ix_op_host_pci_devices_state_name_host_id"

# The fit rule, criterion by criterion. A host fits a demand when:
#   1. it is in neither the avoid set's guids nor its names,
#   2. its status is PLACEABLE,
#   3. its CPUs minus those of its VMs in HOLDS_DEVICES states cover the demand's,
#   4. so does its memory,
#   5. it has at least ``count`` FREE devices of every requested name,
#   6. with NUMA policy ``required``, one NUMA node (a NULL node counts as
#      NO_NODE) has them all: ``count`` FREE devices of every requested name.
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
    statement = _search_statement(len(demand.pci), len(avoid), limit,
                                  numa=demand.numa == "required")
    params: dict[str, object] = {"cpus": demand.cpus, "memory_mb": demand.memory_mb}
    for index, request in enumerate(demand.pci):
        params[f"name_{index}"] = request.name
        params[f"count_{index}"] = request.count
    for index, ref in enumerate(sorted(avoid)):
        params[f"avoid_{index}"] = ref
    after, size = 0, PAGE
    while True:
        params["after"] = after
        rows = statement.execute(session.connection(), params).rows
        if rows or not demand.pci:
            return [Candidate(id=id_, guid=guid, name=name) for id_, guid, name in rows]
        page = _page(size)
        last, count = session.execute(select(func.max(page.c.host_id), func.count())
                                      .select_from(page), params).one()
        if last is None or (count or 0) < size:
            return []
        after, size = int(last), min(size * PAGE_GROWTH, PAGE_MAX)
        statement = _search_statement(len(demand.pci), len(avoid), limit,
                                      numa=demand.numa == "required", page_size=size)


_SEARCHES: dict[tuple[int, int, int, int, bool], PreparedStatement] = {}
#: The states holding CPU and memory, inlined (a prepared statement has no expanding IN).
_HOLDING: list[ColumnElement[str]] = [literal_column(f"'{state}'")
                                      for state in sorted(HOLDS_DEVICES)]


def _page(size: int) -> Subquery:
    """Returns the page: up to ``size`` hosts after ``after`` with ``count_0`` free ``name_0``.

    Read as a range of the index (``state, name, host_id``) from ``after``,
    so a page costs its own rows only. Under NUMA policy ``required`` it does
    not ask for one node: grouping by a column the index lacks would read
    every row of the name.
    """
    query = select(PciDevice.host_id.label("host_id"))
    for dialect in ("mysql", "mariadb"):
        query = query.with_hint(PciDevice.__table__, f"FORCE INDEX ({_PAGE_INDEX})", dialect)
    return (query.where(PciDevice.state == FREE, PciDevice.name == bindparam("name_0"),
                        PciDevice.host_id > bindparam("after"))
            .group_by(PciDevice.host_id).having(func.count() >= bindparam("count_0"))
            .order_by(PciDevice.host_id).limit(size).subquery("page"))


def _used_bound(column: InstrumentedAttribute[int]) -> ScalarSelect[int]:
    return (select(func.coalesce(func.sum(column), 0))
            .where(VmInstance.host_id == Host.id, VmInstance.state.in_(_HOLDING))
            .scalar_subquery())


def _one_node_has_all(names: int) -> ColumnElement[bool]:
    """Returns criterion 6: one NUMA node of ``Host`` has every requested name, counted.

    One correlated subquery: the host's free devices of the requested names,
    grouped by node, kept when the node has ``count_<i>`` of ``name_<i>`` for
    every ``i`` below ``names``.
    """
    enough = [func.sum(case((PciDevice.name == bindparam(f"name_{index}"), 1), else_=0))
              >= bindparam(f"count_{index}") for index in range(names)]
    wanted: list[BindParameter[str]] = [bindparam(f"name_{index}") for index in range(names)]
    return (select(NUMA_NODE)
            .where(PciDevice.host_id == Host.id, PciDevice.state == FREE,
                   PciDevice.name.in_(wanted))
            .group_by(NUMA_NODE).having(and_(*enough)).exists())


def _fit_conditions(names: range, avoided: int, numa: int = 0) -> list[ColumnElement[bool]]:
    """Returns the fit rule over ``Host`` as SQL, for the requested names at ``names``.

    Parameters: ``cpus``, ``memory_mb``, ``name_<i>`` and ``count_<i>`` per
    index in ``names`` (and below ``numa``), ``avoid_<i>`` per avoided guid
    or name. ``numa`` > 0 adds criterion 6 over the first ``numa`` names.
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
    if numa:
        conditions.append(_one_node_has_all(numa))
    return conditions


def _search_statement(names: int, avoided: int, limit: int, *,
                      numa: bool = False, page_size: int = 0) -> PreparedStatement:
    """Returns ``find_hosts``' query (one page of it with PCI requests), prepared once per shape.

    Parameters: those of :func:`_fit_conditions`, and ``after`` (host id)
    with PCI requests; ``page_size`` hosts per page (``PAGE`` unless given).
    """
    page_size = page_size or PAGE
    key = (names, avoided, limit, page_size, numa)
    statement = _SEARCHES.get(key)
    if statement is not None:
        return statement
    query = select(Host.id, Host.guid, Host.name)
    if names:
        # The first name's count comes from the page itself.
        page = _page(page_size)
        query = query.join(page, page.c.host_id == Host.id)
    query = query.where(*_fit_conditions(range(1, names), avoided, names if numa else 0))
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
    by_node: dict[int, dict[int, dict[str, int]]] = {}
    if names:
        columns = [func.sum(case((PciDevice.name == name, 1), else_=0)).label(f"n{i}")
                   for i, name in enumerate(names)]
        grouped = session.execute(
            select(PciDevice.host_id, NUMA_NODE, *columns)
            .where(PciDevice.state == FREE, PciDevice.name.in_(list(names)))
            .group_by(PciDevice.host_id, NUMA_NODE))
        for row in grouped:
            on_node = {name: int(row[i + 2] or 0) for i, name in enumerate(names)}
            by_node.setdefault(row[0], {})[int(row[1])] = on_node
            total = counts.setdefault(row[0], dict.fromkeys(names, 0))
            for name, number in on_node.items():
                total[name] += number
    kept = read_unavailable(session, names)
    return [HostCapacity(id=r.id, guid=r.guid, name=r.name, status=r.status,
                         free_cpus=int(r.free_cpus), free_memory_mb=int(r.free_memory),
                         free_devices=counts.get(r.id, {}), free_by_node=by_node.get(r.id, {}),
                         unavailable=kept.get(r.id, {}))
            for r in rows]


@dataclass(frozen=True)
class Shortfall:
    """One criterion of the fit rule a host misses, with what was wanted and what it has."""

    criterion: Literal["avoided", "status", "cpus", "memory", "devices", "numa"]
    wanted: int = 0
    free: int = 0
    name: str = ""
    #: For ``numa``: per node, by number, the free devices of each requested name.
    nodes: tuple[tuple[int, tuple[int, ...]], ...] = ()
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
                                    unavailable=host.unavailable.get(request.name)))
    if demand.numa == "required" and demand.pci and not any(
            m.criterion == "devices" for m in missed):  # too few in all says it already
        nodes = tuple((node, tuple(counts.get(r.name, 0) for r in demand.pci))
                      for node, counts in sorted(host.free_by_node.items()))
        if not any(all(n >= r.count for n, r in zip(numbers, demand.pci, strict=True))
                   for _, numbers in nodes):
            missed.append(Shortfall("numa", nodes=nodes))
    return missed


def _node_name(node: int) -> str:
    return "devices without a node" if node == NO_NODE else f"node {node}"


def _numa_parts(missed: Shortfall, demand: Demand) -> tuple[str, str]:
    """Returns what one node must have (``2xGPU``) and what each has (``node 0 has 1, ...``)."""
    wanted = " and ".join(f"{r.count}x{r.name}" for r in demand.pci)
    if len(demand.pci) == 1:
        found = [f"{_node_name(node)} {'have' if node == NO_NODE else 'has'} {numbers[0]}"
                 for node, numbers in missed.nodes]
    else:
        found = [f"{_node_name(node)}: " + " ".join(
                     f"{n}x{r.name}" for n, r in zip(numbers, demand.pci, strict=True))
                 for node, numbers in missed.nodes]
    return wanted, ", ".join(found)


def _reason(host: HostCapacity, missed: Shortfall, demand: Demand) -> str:
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
        case "numa":
            wanted, found = _numa_parts(missed, demand)
            return f"no NUMA node has {wanted} free: {found}"


def verdict(host: HostCapacity, demand: Demand, avoid: Collection[str] = ()) -> HostVerdict:
    """Says whether ``host`` can take ``demand`` and, if not, why (pure)."""
    reasons = [_reason(host, missed, demand) for missed in shortfalls(host, demand, avoid)]
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
            detail += ["has no NUMA node with {} free ({})".format(*_numa_parts(m, demand))
                       for m in missed if m.criterion == "numa"]
            parts.append(f"{host.name} " + (", ".join(detail) if detail else "fits now"))
    one_node = " on one NUMA node" if demand.pci and demand.numa == "required" else ""
    what = (f"{wanted} free{one_node}" if demand.pci
            else f"{demand.cpus} CPUs and {demand.memory_mb} MiB free")
    return f"no host has {what}: " + ", ".join(parts)


