"""Allocates PCI devices to VMs inside the caller's transaction: claims, releases, migrations."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Final, TypeAlias

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Connection,
    and_,
    bindparam,
    case,
    false,
    func,
    or_,
    select,
    update,
)

from hostdev.messages.values import DeviceState
from hostdev.mgmt.devices import host_rules
from hostdev.mgmt.devices.availability import choose
from hostdev.mgmt.devices.device_rows import (
    ALLOCATED,
    CLEANING,
    DEVICE_COLUMNS,
    DEVICES,
    FREE,
    NUMA_NODE,
    QUARANTINED,
    REMOVED,
    RESERVED,
    C,
    DeviceCounts,
    state_is,
)

# Allocation callers take these from the module that hands devices out.
from hostdev.mgmt.devices.device_rows import ClaimRaceLost as ClaimRaceLost
from hostdev.mgmt.devices.device_rows import HeldDevice as HeldDevice
from hostdev.mgmt.devices.pci_inventory import locks_rows
from hostdev.mgmt.errors import InvalidRequest, NoCapacity
from hostdev.mgmt.persistence.database import PreparedStatement
from hostdev.mgmt.persistence.models import utcnow

_HOSTS: Final = host_rules.HOSTS
# What a device becomes when its VM lets go: a quarantined one was already
# gone from the inventory, so it is removed rather than offered again; one a
# guest had, on a host that resets released devices, waits in cleaning for
# the reset (hostdev.mgmt.devices.cleaning); the others are free.
_RESETS_ON_RELEASE = (select(_HOSTS.c.reset_on_release).where(_HOSTS.c.id == C.host_id)
                      .scalar_subquery())
_LET_GO: Final = case((state_is(QUARANTINED), REMOVED),
                      (and_(state_is(ALLOCATED), _RESETS_ON_RELEASE.is_(True)), CLEANING),
                      else_=FREE)


class InsufficientDevices(NoCapacity):
    """A host has fewer free devices of a name than a request asks for.

    ``detail`` is the refusal without the host; ``by_rules``: the host's rows
    were read whole under its lock (device rules), so it is final, not a race.
    """

    def __init__(self, reason: str, *, host_id: int, name: str, wanted: int, free: int,
                 detail: str = "", by_rules: bool = False) -> None:
        super().__init__(reason)
        self.host_id = host_id
        self.name = name
        self.wanted = wanted
        self.free = free
        self.detail = detail or reason
        self.by_rules = by_rules


# Every state change is a conditional UPDATE checked by its row count, and
# claims pick rows with FOR UPDATE SKIP LOCKED, so several daemons share one
# MariaDB; SQLite (one daemon) serialises writers with BEGIN IMMEDIATE.
# The hot statements are built and compiled once, and run on the DBAPI
# cursor: per call, Core's statement building and execution cost about as
# much as the round trip itself (bench/alloc.py measures it).
# A host with device rules is claimed from otherwise (``_take``): the pick reads
# its flag in the same statement (a locking read does not lock the rows its
# subqueries read) and then matches and locks nothing, so a plain host's
# claim costs no extra round trip and a ruled one's locks its host row first.
_RULES_OF_HOST = (select(_HOSTS.c.device_rules).where(_HOSTS.c.id == bindparam("host_id"))
                  .scalar_subquery())
_OF_NAME = (C.host_id == bindparam("host_id"), C.name == bindparam("name"), state_is(FREE))
#: on one NUMA node (``numa_node``, NO_NODE for devices without one) -> the conditions.
_WHERE = {False: _OF_NAME,
          True: (*_OF_NAME, NUMA_NODE == bindparam("numa_node"))}  # noqa: SIM300 (SQL, not a constant)
_FREE_OF_NAME = {on_node: select(*DEVICE_COLUMNS)
                 .where(*where, _RULES_OF_HOST == false())  # noqa: SIM300 (SQL)
                 .order_by(C.id).limit(bindparam("count")) for on_node, where in _WHERE.items()}
#: (on one node, locking with SKIP LOCKED) -> the SELECT a claim picks its devices with.
_PICK = {(on_node, locking): PreparedStatement(
    query.with_for_update(skip_locked=True) if locking else query)
    for on_node, query in _FREE_OF_NAME.items() for locking in (False, True)}
#: on one node -> (device_rules, free devices of the name) of one host.
_FREE_COUNT = {on_node: select(_HOSTS.c.device_rules, select(func.count()).where(*where)
                               .scalar_subquery()).where(_HOSTS.c.id == bindparam("host_id"))
               for on_node, where in _WHERE.items()}
_TAKE: dict[tuple[bool, int], PreparedStatement] = {}


def _take_statement(reserve: bool, count: int) -> PreparedStatement:
    """Returns the conditional UPDATE that takes ``count`` free devices by id."""
    statement = _TAKE.get((reserve, count))
    if statement is None:
        holder = C.reserved_for if reserve else C.instance_id
        ids: list[BindParameter[Any]] = [bindparam(f"id_{i}") for i in range(count)]
        statement = PreparedStatement(
            update(DEVICES)
            .where(C.id.in_(ids), state_is(FREE))
            .values({C.state: RESERVED if reserve else ALLOCATED, holder: bindparam("vm_id"),
                     C.updated_at: bindparam("now")})
        )
        _TAKE[(reserve, count)] = statement
    return statement


_LET_GO_VALUES: Final[dict[Any, Any]] = {
    C.state: _LET_GO, C.instance_id: None, C.reserved_for: None, C.updated_at: bindparam("now")
}
_HELD_OR_RESERVED = or_(C.instance_id == bindparam("vm_id"), C.reserved_for == bindparam("vm_id"))
# Scalar subqueries, not a join: a locking read does not lock the rows its
# subqueries read, so a release locks its host's row only where rules need it.
_HOST_GUID = (select(_HOSTS.c.guid).where(_HOSTS.c.id == C.host_id)
              .scalar_subquery().label("host_guid"))
_HOST_RULES = (select(_HOSTS.c.device_rules).where(_HOSTS.c.id == C.host_id)
               .scalar_subquery().label("host_rules"))


def _held(on_host: bool, locking: bool) -> PreparedStatement:
    where: list[ColumnElement[bool]] = [_HELD_OR_RESERVED]
    if on_host:
        where.append(C.host_id == bindparam("on_host"))
    query = select(*DEVICE_COLUMNS, _HOST_GUID, _HOST_RULES).where(*where).order_by(C.id)
    return PreparedStatement(query.with_for_update() if locking else query)


#: (on one host, locking) -> the SELECT of what a release lets go of.
_HELD = {(on_host, locking): _held(on_host, locking)
         for on_host in (False, True) for locking in (False, True)}
_LET_GO_BY_ID: dict[int, PreparedStatement] = {}


def _let_go_statement(count: int) -> PreparedStatement:
    """Returns the UPDATE that lets go of ``count`` devices of a VM by id."""
    statement = _LET_GO_BY_ID.get(count)
    if statement is None:
        ids: list[BindParameter[Any]] = [bindparam(f"id_{i}") for i in range(count)]
        statement = PreparedStatement(
            update(DEVICES).where(C.id.in_(ids), _HELD_OR_RESERVED).values(_LET_GO_VALUES))
        _LET_GO_BY_ID[count] = statement
    return statement


def _wanted(requests: Mapping[str, int]) -> list[tuple[str, int]]:
    for name, count in requests.items():
        if count < 0 or not name:
            raise InvalidRequest(
                f"PCI request {name!r} x {count}: a name must be non-empty and a count "
                "at least 0; fix the offering"
            )
    # Sorted so concurrent claims lock index ranges in one order.
    return sorted((name, count) for name, count in requests.items() if count)


def _pick(conn: Connection, host_id: int, wanted: list[tuple[str, int]],
          state: DeviceState, numa_node: int | None) -> list[HeldDevice] | None:
    """Picks free rows of each name on a host without device rules (SKIP LOCKED on MariaDB).

    With ``numa_node``, only devices on that node. Returns None, having
    picked nothing, when the host has device rules.
    """
    picked: list[HeldDevice] = []
    locking = locks_rows(conn)
    on_node = numa_node is not None
    pick = _PICK[(on_node, locking)]
    for name, count in wanted:
        of_name = {"host_id": host_id, "name": name, "count": count, "numa_node": numa_node}
        rows = pick.execute(conn, of_name).rows
        if len(rows) < count:
            ruled, free = conn.execute(_FREE_COUNT[on_node], of_name).one()
            if ruled and not picked:
                return None
            if locking and free >= count:
                # Enough exist, but other transactions hold locks on them.
                raise ClaimRaceLost(f"host {host_id}: {name} devices are locked by others")
            raise insufficient(host_id, name, count, int(free), numa_node)
        # Picked rows are still free; the UPDATE in _take gives them their new state.
        picked.extend(replace(HeldDevice.of(row), state=state) for row in rows)
    return picked


def insufficient(host_id: int, name: str, wanted: int, free: int,
                  numa_node: int | None = None, *, by_rules: bool = False) -> InsufficientDevices:
    where = f" on NUMA node {numa_node}" if numa_node is not None else ""
    detail = (f"has {free} {name} free{where}, but not {wanted} that one VM may hold together "
              "(an IOMMU group goes whole to one VM, a PF never with its own VFs)"
              if by_rules and free >= wanted else f"needs {wanted}x{name}{where}, {free} free")
    return InsufficientDevices(
        f"host {host_id}: {detail}; pick another host or free devices", host_id=host_id,
        name=name, wanted=wanted, free=free, detail=detail, by_rules=by_rules)


def _take(
    conn: Connection, vm_id: int, host_id: int, requests: Mapping[str, int], *, reserve: bool,
    numa_node: int | None = None,
) -> tuple[HeldDevice, ...]:
    wanted = _wanted(requests)
    if not wanted:
        return ()
    state = RESERVED if reserve else ALLOCATED
    plain = _pick(conn, host_id, wanted, state, numa_node)
    ruled = plain is None
    if plain is None:
        # The host's claims run one at a time: choose over all its rows, whole groups.
        host_rules.serialize(conn, host_id)
        facts = host_rules.read_facts(conn, host_id)
        choice = choose(facts, dict(wanted), numa_node)
        if choice.short is not None:
            raise insufficient(host_id, *choice.short, numa_node, by_rules=True)
        picked = [HeldDevice(d.id, host_id, d.name, d.address, state) for d in choice.taken]
    else:
        picked = plain
    params: dict[str, Any] = {f"id_{i}": device.id for i, device in enumerate(picked)}
    params.update(vm_id=vm_id, now=utcnow())
    taken = _take_statement(reserve, len(picked)).execute(conn, params).rowcount
    if taken != len(picked):
        raise ClaimRaceLost(
            f"host {host_id}: {len(picked) - taken} of {len(picked)} picked devices "
            "were taken concurrently",
            written=taken,
        )
    if ruled:
        host_rules.apply_rules(conn, host_id)  # read again: reasons name the new holder
    return tuple(picked)


def claim_devices(
    conn: Connection, vm_id: int, host_id: int, requests: Mapping[str, int], *,
    numa_node: int | None = None,
) -> tuple[HeldDevice, ...]:
    """Allocates ``count`` free devices of each requested name on one host to a VM.

    With ``numa_node``, only devices on that NUMA node (``hostdev.mgmt.devices.numa``).

    All or nothing: either every request is met or the caller's transaction
    must be rolled back. Not idempotent by itself: calling it twice claims
    twice; callers make it run once by tying it to a conditional VM transition.

    Raises:
        InsufficientDevices: the host has too few free devices of a name.
        ClaimRaceLost: a concurrent transaction won; retry in a NEW transaction.
    """
    return _take(conn, vm_id, host_id, requests, reserve=False, numa_node=numa_node)


def reserve_devices(
    conn: Connection, vm_id: int, host_id: int, requests: Mapping[str, int], *,
    numa_node: int | None = None,
) -> tuple[HeldDevice, ...]:
    """Reserves a migration's destination set on ``host_id`` while the VM keeps its source set.

    Same guarantees and errors as :func:`claim_devices`; reserved devices are
    neither offered nor held until :func:`commit_migration`.
    """
    return _take(conn, vm_id, host_id, requests, reserve=True, numa_node=numa_node)


#: A device a release let go of, as it was before, and the guid of its host.
Released: TypeAlias = tuple[HeldDevice, str]


def release_devices(
    conn: Connection, vm_id: int, host_id: int | None = None
) -> tuple[Released, ...]:
    """Lets go of every device a VM holds or has reserved, on one host or on all.

    Idempotent. Held devices become free (cleaning, on a host that resets
    released devices); reserved ones free; quarantined ones removed.
    The rows are locked (``FOR UPDATE``) as they are read, so the devices
    returned, in id order, are exactly the ones let go; each comes with its
    host's guid, read in the same statement, for the events that name it.
    On a host with device rules the release then serializes on the host row
    and applies the rules. That host row is locked after the VM's device
    rows, against the usual order: what serialized transactions write on
    the host is free or unavailable rows (never this VM's), or rows their
    locking reads take whole (an inventory change), which InnoDB reports as
    a deadlock and the unit of work retries.
    """
    params: dict[str, Any] = {"vm_id": vm_id, "on_host": host_id}
    rows = _HELD[(host_id is not None, locks_rows(conn))].execute(conn, params).rows
    if not rows:
        return ()
    ruled = [h for h in sorted({row[1] for row in rows if row[-1]})
             if host_rules.serialize(conn, h)]
    params = {f"id_{i}": row[0] for i, row in enumerate(rows)}
    params.update(vm_id=vm_id, now=utcnow())
    changed = _let_go_statement(len(rows)).execute(conn, params).rowcount
    if changed != len(rows):  # cannot happen while the rows are locked; never hide it
        raise ClaimRaceLost(f"VM {vm_id}: {len(rows) - changed} of {len(rows)} devices changed "
                            "during their release", written=changed)
    for ruled_host in ruled:
        host_rules.apply_rules(conn, ruled_host)
    return tuple((HeldDevice.of(row[:-2]), row[-2] or "") for row in rows)


def commit_migration(
    conn: Connection, vm_id: int, source_host_id: int, destination_host_id: int
) -> int:
    """Ends a successful migration: frees the source set, allocates the reserved set.

    The source set becomes free, or cleaning on a host that resets released devices.

    Idempotent: a second call finds nothing left to change. A reserved device
    that was quarantined meanwhile stays quarantined, now held by the VM.
    Returns how many destination devices the VM now holds.
    """
    if source_host_id == destination_host_id:
        raise InvalidRequest(
            f"VM {vm_id}: a migration's source and destination are both host "
            f"{source_host_id}; they must differ"
        )
    ruled = [h for h in sorted((source_host_id, destination_host_id))
             if host_rules.serialize(conn, h)]
    now = utcnow()
    conn.execute(
        update(DEVICES)
        .where(C.host_id == source_host_id, C.instance_id == vm_id)
        .values({C.state: _LET_GO, C.instance_id: None, C.updated_at: now})
    )
    result = conn.execute(
        update(DEVICES)
        .where(C.host_id == destination_host_id, C.reserved_for == vm_id)
        .values({
            C.state: case((state_is(QUARANTINED), QUARANTINED), else_=ALLOCATED),
            C.instance_id: vm_id,
            C.reserved_for: None,
            C.updated_at: now,
        })
    )
    for host_id in ruled:
        host_rules.apply_rules(conn, host_id)
    return int(result.rowcount)


def abort_migration(conn: Connection, vm_id: int, destination_host_id: int) -> int:
    """Ends a failed migration: frees the destination set; the VM keeps its source set.

    Idempotent. Returns how many reserved devices were let go.
    """
    ruled = host_rules.serialize(conn, destination_host_id)
    result = conn.execute(
        update(DEVICES)
        .where(C.host_id == destination_host_id, C.reserved_for == vm_id)
        .values({C.state: _LET_GO, C.reserved_for: None, C.updated_at: utcnow()})
    )
    if ruled:
        host_rules.apply_rules(conn, destination_host_id)
    return int(result.rowcount)


def device_counts(conn: Connection, host_id: int | None = None) -> list[DeviceCounts]:
    """Counts devices per host and name by state, for one host or all, sorted."""
    query = select(C.host_id, C.name, C.state, func.count()).group_by(
        C.host_id, C.name, C.state
    )
    if host_id is not None:
        query = query.where(C.host_id == host_id)
    counts: dict[tuple[int, str], DeviceCounts] = {}
    for row_host, name, state, number in conn.execute(query):
        entry = counts.setdefault((row_host, name), DeviceCounts(row_host, name))
        setattr(entry, state, int(number))
    return [counts[key] for key in sorted(counts)]


def devices_of_vm(conn: Connection, vm_id: int) -> tuple[HeldDevice, ...]:
    """Returns every device a VM holds or has reserved (quarantined ones too), by id."""
    query = (
        select(*DEVICE_COLUMNS)
        .where(or_(C.instance_id == vm_id, C.reserved_for == vm_id))
        .order_by(C.id)
    )
    return tuple(HeldDevice.of(row) for row in conn.execute(query))


def free_devices(conn: Connection, host_id: int,
                 numa_node: int | None = None) -> tuple[HeldDevice, ...]:
    """Returns the free devices of a host (on ``numa_node`` only), by id: what a move may take."""
    query = select(*DEVICE_COLUMNS).where(C.host_id == host_id, state_is(FREE)).order_by(C.id)
    if numa_node is not None:
        query = query.where(NUMA_NODE == numa_node)  # noqa: SIM300 (SQL, not a constant)
    return tuple(HeldDevice.of(row) for row in conn.execute(query))
