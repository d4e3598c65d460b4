"""Placement's SQL search: the first hosts, by id, that fit a demand (docs/database.md).

Three reads, each one prepared query, taken in turn:

1. With PCI requests, the *device page*: the first ``PAGE`` hosts after
   ``after`` that have enough free devices of the first requested name, read
   from the device index ``(state, name, host_id)``; full hosts have no row
   there and cost nothing. The hosts of the page that meet the rest of the
   fit rule are the answer, when there are any.
2. When a whole page is refused (or without PCI requests), the *blocks*: the
   next ``BLOCKS`` blocks of 256 host ids (``GROWTH`` times more each turn)
   that may hold a host with the CPUs and memory asked for
   (``hostdev.mgmt.placement.blocks``); blocks whose Up hosts are all short of
   CPU or memory, or that have no Up host, are skipped without reading a host.
3. The *host search* over the host ids of those blocks (their first
   ``RANGES`` runs of consecutive blocks): the Up hosts in id order
   through the index ``(status, id, cpus, used_cpus, memory_mb,
   used_memory_mb)``, those short of CPU or memory refused on the index entry
   alone, the others asked for their free devices through ``(host_id, name,
   state)``.

Each turn goes on where the last stopped: no host before it fits. Full hosts
cost the device page nothing; hosts refused for status, CPU or memory cost
the host search nothing outside the blocks it reads (docs/database.md).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Final

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Connection,
    Select,
    Subquery,
    and_,
    bindparam,
    case,
    func,
    or_,
    select,
)
from sqlalchemy.orm import Session

from hostdev.mgmt.devices.device_rows import FREE, NUMA_NODE
from hostdev.mgmt.persistence.database import PreparedStatement
from hostdev.mgmt.persistence.models import Host, PciDevice
from hostdev.mgmt.placement import blocks
from hostdev.mgmt.placement.demand import PLACEABLE, Candidate, Demand

#: Hosts with enough free devices of the first requested name read in the device page.
PAGE: Final = 64
#: The device index the page reads as a range (``state, name, host_id``). MariaDB
#: left to itself reads it as ``ref`` on (state, name) and filters ``host_id >
#: after``: a page after N then costs every row before N (docs/database.md).
_PAGE_INDEX: Final = "ix_op_host_pci_devices_state_name_host_id"
#: Ranges of host ids the host search reads in a turn: each a block (of
#: ``blocks.BLOCK`` host ids) or a run of consecutive blocks that may fit.
RANGES: Final = 4
#: Blocks that may fit the first turn reads at most; each next turn ``GROWTH`` times more
#: (up to ``MOST_BLOCKS``), so a long stretch of blocks that claim more room than their hosts
#: have (not yet tightened) is crossed in few turns.
BLOCKS: Final = 4
GROWTH: Final = 8
MOST_BLOCKS: Final = 4096
#: The host index the host search reads as a range (``status = 'Up' AND id > after``).
HOST_INDEX: Final = "ix_hosts_status_id_cpus_used_cpus_memory_mb_used_memory_mb"


def find_hosts(session: Session, demand: Demand, *, avoid: Collection[str] = (),
               limit: int = 5) -> list[Candidate]:
    """Returns up to ``limit`` hosts that fit ``demand``, first fit (by host id).

    ``avoid`` holds host guids or names to leave out (hosts already tried,
    or named by the request). With PCI requests the device page is read
    first; when all its hosts are refused, the host search reads the next
    blocks that may fit, then the device page after them, and so on; the
    answer holds the fitting hosts of the first page or search that has any. The
    caller claims on the first host in the same transaction; a lost race
    rolls back and the next host is tried in a new transaction.
    """
    if session.autoflush and (session.new or session.dirty or session.deleted):
        session.flush()  # as a query's autoflush would
    return search_hosts(session.connection(), demand, avoid=avoid, limit=limit)


def search_hosts(connection: Connection, demand: Demand, *, avoid: Collection[str] = (),
                 limit: int = 5) -> list[Candidate]:
    """:func:`find_hosts` on a connection: for a caller that writes through Core alone
    (a deploy), with no session to flush first."""
    numa = demand.numa == "required"
    params: dict[str, object] = {"cpus": demand.cpus, "memory_mb": demand.memory_mb,
                                 "after": 0}
    for index, request in enumerate(demand.pci):
        params[f"name_{index}"] = request.name
        params[f"count_{index}"] = request.count
    for index, ref in enumerate(sorted(avoid)):
        params[f"avoid_{index}"] = ref
    want, after, reach = blocks.wanted(demand.cpus, demand.memory_mb), 0, BLOCKS
    page = _page_search(len(demand.pci), len(avoid), limit, numa) if demand.pci else None
    hosts = _host_search(len(demand.pci), len(avoid), limit, numa)
    while True:
        if page is not None:
            rows = page.execute(connection, params).rows
            if rows:
                return _candidates(rows)
            last, count = _PAGE_END.execute(connection, params).rows[0]
            if last is None or (count or 0) < PAGE:
                return []  # no host after the page has the devices
            after = int(last)  # no host up to ``last`` fits
        found = blocks.fitting(connection, after, want, reach)
        if not found:
            return []  # no host after ``after`` has the room
        params["after"] = after = ranges(found, after, params)
        rows = hosts.execute(connection, params).rows
        if rows:
            return _candidates(rows)
        reach = min(reach * GROWTH, MOST_BLOCKS)


def ranges(found: list[int], after: int, params: dict[str, object]) -> int:
    """Sets the host search's ranges (``low_<i>``, ``high_<i>``) to the first ``RANGES`` runs
    of consecutive blocks in ``found`` (in order), from host ``after`` on; returns the last
    host id they reach. Fewer runs: the last again, empty."""
    runs: list[list[int]] = []
    for block in found:
        if runs and runs[-1][1] == block - 1:
            runs[-1][1] = block
        elif len(runs) < RANGES:
            runs.append([block, block])
        else:
            break
    for index in range(RANGES):
        first, last = runs[min(index, len(runs) - 1)]
        params[f"low_{index}"] = max(after, (first << blocks.BLOCK_SHIFT) - 1)
        params[f"high_{index}"] = after = ((last + 1) << blocks.BLOCK_SHIFT) - 1
    return after


def _candidates(rows: list[tuple[int, str, str]]) -> list[Candidate]:
    return [Candidate(id=id_, guid=guid, name=name) for id_, guid, name in rows]


def _page(size: int = PAGE) -> Subquery:
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


#: The last host of the device page and how many hosts it has.
_PAGE_END = PreparedStatement((lambda page: select(func.max(page.c.host_id), func.count())
                                            .select_from(page))(_page()))


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
    The status, CPU and memory criteria read only columns of ``HOST_INDEX``.
    """
    conditions: list[ColumnElement[bool]] = [
        Host.status == PLACEABLE,
        Host.cpus - Host.used_cpus >= bindparam("cpus"),
        Host.memory_mb - Host.used_memory_mb >= bindparam("memory_mb"),
    ]
    if avoided:
        refs: list[BindParameter[str]] = [bindparam(f"avoid_{index}")
                                          for index in range(avoided)]
        conditions += [Host.guid.not_in(refs), Host.name.not_in(refs)]
    for index in names:
        free = (select(func.count())
                .where(PciDevice.host_id == Host.id, PciDevice.name == bindparam(f"name_{index}"),
                       PciDevice.state == FREE)
                .scalar_subquery())
        conditions.append(free >= bindparam(f"count_{index}"))
    if numa:
        conditions.append(_one_node_has_all(numa))
    return conditions


#: The prepared searches by (kind, names, avoided, limit, numa): built once per shape.
_SEARCHES: dict[tuple[str, int, int, int, bool], PreparedStatement] = {}


def _prepared(kind: str, names: int, avoided: int, limit: int, numa: bool,
              build: Callable[[], Select[int, str, str]]) -> PreparedStatement:
    key = (kind, names, avoided, limit, numa)
    statement = _SEARCHES.get(key)
    if statement is None:  # building the query costs as much as running it
        statement = _SEARCHES[key] = PreparedStatement(build().order_by(Host.id).limit(limit))
    return statement


def _page_search(names: int, avoided: int, limit: int, numa: bool) -> PreparedStatement:
    """Returns the device page's search (``names`` > 0), prepared once per shape.

    Parameters: those of :func:`_fit_conditions` and ``after`` (0).
    """
    def build() -> Select[int, str, str]:
        page = _page()
        # The first name's count comes from the page itself.
        return (select(Host.id, Host.guid, Host.name).join(page, page.c.host_id == Host.id)
                .where(*_fit_conditions(range(1, names), avoided, names if numa else 0)))
    return _prepared("page", names, avoided, limit, numa, build)


def _host_search(names: int, avoided: int, limit: int, numa: bool) -> PreparedStatement:
    """Returns the host search over ``RANGES`` ranges of host ids, prepared once per shape.

    Parameters: those of :func:`_fit_conditions`, ``low_<i>`` and
    ``high_<i>`` for each ``i`` below ``RANGES`` (the hosts with ids in
    ``(low_i, high_i]``). Names the host index (MariaDB only): left to itself
    MariaDB reads it as ``ref`` on ``status`` and filters the ids entry by
    entry, from the first Up host.
    """
    def build() -> Select[int, str, str]:
        query = select(Host.id, Host.guid, Host.name)
        for dialect in ("mysql", "mariadb"):
            query = query.with_hint(Host.__table__, f"FORCE INDEX ({HOST_INDEX})", dialect)
        ranges = [and_(Host.id > bindparam(f"low_{index}"), Host.id <= bindparam(f"high_{index}"))
                  for index in range(RANGES)]
        # The span of all ranges too: SQLite reads it as one range of the index, and
        # MariaDB intersects it with the ranges (no change).
        span = (Host.id > bindparam("low_0"), Host.id <= bindparam(f"high_{RANGES - 1}"))
        return query.where(*span, or_(*ranges),
                           *_fit_conditions(range(names), avoided, names if numa else 0))
    return _prepared("hosts", names, avoided, limit, numa, build)
