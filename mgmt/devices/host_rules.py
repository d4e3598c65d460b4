"""Keeps one host's device rows true to the hardware rules, inside the caller's transaction.

Serialization: on a host whose devices the rules tie together
(``hosts.device_rules``), every transaction that changes device states
first bumps ``hosts.device_epoch``. Two such transactions thus write one
common row: InnoDB makes the second wait for the first's commit (row lock),
Galera, which does not replicate locks, certifies one and fails the other at
COMMIT with a deadlock error that the unit of work retries. Hosts without
rules keep the ``FOR UPDATE SKIP LOCKED`` concurrency of plain claims: the
conditional bump matches no row there, and under READ COMMITTED InnoDB
keeps no lock on a row its UPDATE does not change.

After its change, the transaction reads the host's rows again and makes
every free or unavailable device follow :func:`~.availability.rule_changes`
with conditional UPDATEs checked by row count (a mismatch is a lost race:
``ClaimRaceLost``, retried in a new transaction).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, cast

from sqlalchemy import Connection, Table, Update, bindparam, func, select, true, update

from hostdev.messages.pci_address import PciAddress
from hostdev.mgmt.devices.availability import (
    RULED_STATES,
    DeviceFacts,
    RuleChanges,
    has_rules,
    rule_changes,
)
from hostdev.mgmt.devices.device_rows import (
    DEVICES,
    FREE,
    REMOVED,
    UNAVAILABLE,
    C,
    ClaimRaceLost,
    address_from,
    state_is,
    state_is_not,
)
from hostdev.mgmt.persistence.database import PreparedStatement
from hostdev.mgmt.persistence.models import Host, VmInstance, utcnow

HOSTS: Final = cast(Table, Host.__table__)
_VMS: Final = cast(Table, VmInstance.__table__)
_BUMP: Final = {HOSTS.c.device_epoch: HOSTS.c.device_epoch + 1,
                HOSTS.c.updated_at: HOSTS.c.updated_at}
_SERIALIZE = PreparedStatement(
    update(HOSTS).where(HOSTS.c.id == bindparam("host_id"), HOSTS.c.device_rules == true())
    .values(_BUMP))
_FACTS_OF_HOSTS = (
    select(C.id, C.domain, C.bus, C.slot, C.function, C.name, C.state, C.iommu_group,
           C.physical_function, C.withheld, C.reason, _VMS.c.name, C.numa_node, C.host_id)
    .select_from(DEVICES.outerjoin(_VMS, _VMS.c.id == func.coalesce(C.instance_id,
                                                                    C.reserved_for)))
    .where(C.host_id.in_(bindparam("host_ids", expanding=True)), state_is_not(REMOVED))
    .order_by(C.id)
)
_FACTS = (
    select(*_FACTS_OF_HOSTS.selected_columns)
    .select_from(DEVICES.outerjoin(_VMS, _VMS.c.id == func.coalesce(C.instance_id,
                                                                    C.reserved_for)))
    .where(C.host_id == bindparam("host_id"), state_is_not(REMOVED))
    .order_by(C.id)
)


def serialize(conn: Connection, host_id: int) -> bool:
    """Bumps the host's ``device_epoch`` if it has device rules; True when it has.

    Call it before reading or locking the host's device rows (lock order:
    host row, then device rows).
    """
    return int(_SERIALIZE.execute(conn, {"host_id": host_id}).rowcount) == 1


def serialize_always(conn: Connection, host_id: int) -> None:
    """Bumps the host's ``device_epoch`` whatever its rules (an inventory may bring some)."""
    conn.execute(update(HOSTS).where(HOSTS.c.id == host_id).values(_BUMP))


def read_facts(conn: Connection, host_id: int) -> list[DeviceFacts]:
    """Returns what the rules read of every device of a host still in its inventory."""
    return [_facts(row) for row in conn.execute(_FACTS, {"host_id": host_id})]


def read_facts_of(conn: Connection, host_ids: Sequence[int]) -> dict[int, list[DeviceFacts]]:
    """:func:`read_facts` of several hosts in one read, by host id."""
    facts: dict[int, list[DeviceFacts]] = {host_id: [] for host_id in host_ids}
    for row in conn.execute(_FACTS_OF_HOSTS, {"host_ids": list(host_ids)}):
        facts[row[13]].append(_facts(row))
    return facts


def _facts(row: Sequence[Any]) -> DeviceFacts:
    return DeviceFacts(id=row[0], address=address_from(*row[1:5]), name=row[5], state=row[6],
                       iommu_group=row[7],
                       physical_function=PciAddress(row[8]) if row[8] else None,
                       withheld=row[9], reason=row[10], holder=row[11] or "",
                       numa_node=row[12])


def apply_rules(conn: Connection, host_id: int,
                facts: Sequence[DeviceFacts] | None = None) -> RuleChanges:
    """Makes the host's free and unavailable devices follow the rules; returns what changed.

    ``facts`` are the host's rows as this transaction left them, when the
    caller has them in hand (a claim); else they are read.

    Raises:
        ClaimRaceLost: a device changed state under us (the host was not serialized).
    """
    changes = rule_changes(read_facts(conn, host_id) if facts is None else facts)
    now = utcnow()
    by_reason: dict[str, list[int]] = {}
    for device_id, reason in changes.unavailable.items():
        by_reason.setdefault(reason, []).append(device_id)
    for reason, ids in sorted(by_reason.items()):
        _checked(conn, host_id, ids, update(DEVICES)
                 .where(C.id.in_(ids), C.state.in_(sorted(RULED_STATES)))
                 .values(state=UNAVAILABLE, reason=reason, updated_at=now))
    if changes.free:
        ids = list(changes.free)
        _checked(conn, host_id, ids, update(DEVICES)
                 .where(C.id.in_(ids), state_is(UNAVAILABLE))
                 .values(state=FREE, reason="", updated_at=now))
    return changes


def _checked(conn: Connection, host_id: int, ids: list[int], statement: Update) -> None:
    changed = conn.execute(statement).rowcount
    if changed != len(ids):
        raise ClaimRaceLost(f"host {host_id}: {len(ids) - changed} of {len(ids)} devices "
                            "changed state while the hardware rules were applied")


def refresh(conn: Connection, host_id: int) -> bool:
    """Records whether the host has device rules, then applies them; returns the flag.

    For an inventory change (a start-up), which serialized with
    :func:`serialize_always` first.
    """
    facts = read_facts(conn, host_id)
    flag = has_rules(facts)
    record_flag(conn, host_id, flag)
    apply_rules(conn, host_id, facts)
    return flag


def record_flag(conn: Connection, host_id: int, flag: bool) -> None:
    """Sets ``hosts.device_rules`` to ``flag`` (one UPDATE, matching nothing when it already is)."""
    conn.execute(update(HOSTS).where(HOSTS.c.id == host_id, HOSTS.c.device_rules != flag)
                 .values({HOSTS.c.device_rules: flag, HOSTS.c.updated_at: HOSTS.c.updated_at}))
