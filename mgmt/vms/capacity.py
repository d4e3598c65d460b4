"""Keeps ``hosts.used_cpus`` and ``hosts.used_memory_mb``: what the VMs on a host hold.

A VM holds its CPUs and memory on ``host_id`` while it is in a
``HOLDS_DEVICES`` state (Starting, Running, Stopping, Migrating). Every
change of a VM's ``(host_id, state)`` goes through :func:`moved`, in the
transaction that makes the change: the VM lifecycle's conditional UPDATE
(``vm_lifecycle``) and a committed migration's host change
(:func:`move_to_host`). So ``used_*`` of a host always equals the sum over
its VMs in those states; placement compares them with the host's ``cpus``
and ``memory_mb`` through one index (docs/database.md, "Placement's search").
Room given back also sets the host's cell in its block
(``hostdev.mgmt.placement.blocks``); room taken writes nothing more.

The UPDATE adds to the column (``used_cpus = used_cpus + n``): two daemons
changing VMs of one host at once each add their own, under InnoDB's row lock.
``updated_at`` keeps its value: it says when the host last reported.
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import Connection, Table, bindparam, update

from hostdev.messages.values import VmState
from hostdev.mgmt.persistence.database import PreparedStatement
from hostdev.mgmt.persistence.models import Host, VmInstance, utcnow
from hostdev.mgmt.placement import blocks
from hostdev.mgmt.vms.vm_states import HOLDS_DEVICES

_HOSTS = cast(Table, Host.__table__)
_VMS = cast(Table, VmInstance.__table__)
_ADD = PreparedStatement(
    update(_HOSTS).where(_HOSTS.c.id == bindparam("host_id"))
    .values({_HOSTS.c.used_cpus: _HOSTS.c.used_cpus + bindparam("cpus"),
             _HOSTS.c.used_memory_mb: _HOSTS.c.used_memory_mb + bindparam("memory_mb"),
             _HOSTS.c.updated_at: _HOSTS.c.updated_at}))
_MOVE = PreparedStatement(
    update(_VMS).where(_VMS.c.id == bindparam("vm_id"),
                       _VMS.c.update_count == bindparam("old_count"))
    .values({_VMS.c.host_id: bindparam("target_id"), _VMS.c.last_host_id: bindparam("source_id"),
             _VMS.c.numa_node: bindparam("numa_node"),
             _VMS.c.update_count: bindparam("new_count"),
             _VMS.c.updated_at: bindparam("now")}))


def holding(host_id: int | None, state: VmState) -> int | None:
    """Returns the host whose CPUs and memory a VM in ``state`` on ``host_id`` holds, or None."""
    return host_id if host_id is not None and state in HOLDS_DEVICES else None


def moved(conn: Connection, vm: VmInstance, before: tuple[int | None, VmState],
          after: tuple[int | None, VmState]) -> None:
    """Moves ``vm``'s CPUs and memory from ``before``'s host to ``after``'s, each ``(host_id,
    state)``: given back when it stops holding, taken when it starts, nothing when the host
    it holds on stays the same. The one place ``used_cpus``/``used_memory_mb`` change."""
    source, target = holding(*before), holding(*after)
    if source == target:
        return
    for host_id, sign in ((source, -1), (target, 1)):
        if host_id is not None:
            _ADD.execute(conn, {"host_id": host_id, "cpus": sign * vm.cpus,
                                "memory_mb": sign * vm.memory_mb})
    if source is not None:  # the room given back may put the host in a higher cell
        blocks.raise_host(conn, source)


def move_to_host(conn: Connection, vm: VmInstance, target_id: int,
                 numa_node: int | None) -> bool:
    """Moves a migrating ``vm`` to ``target_id`` (a committed migration), capacity with it.

    A conditional UPDATE on ``update_count``; returns False (nothing changed)
    when the VM changed since it was read.
    """
    source_id = vm.host_id
    result = _MOVE.execute(conn, {"vm_id": vm.id, "old_count": vm.update_count,
                                  "target_id": target_id, "source_id": source_id,
                                  "numa_node": numa_node, "new_count": vm.update_count + 1,
                                  "now": utcnow()})
    if result.rowcount != 1:
        return False
    moved(conn, vm, (source_id, vm.state), (target_id, vm.state))
    return True
