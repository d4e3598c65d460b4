"""Claims under an offering's NUMA policy: which node of a host takes a VM's devices.

``required``: every device on one NUMA node, or the claim is refused;
``preferred``: on one node when the host has one with room, else anywhere;
``none``: anywhere. Devices whose host reports no node count as one node,
``NO_NODE``. The node is the first, by number, with enough free devices of
every requested name (a migration prefers the node the VM is on, so that the
guest's memory binding, which travels with it, stays right).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BindParameter, Connection, bindparam, case, func, select

from hostdev.messages.values import NumaPolicy
from hostdev.mgmt.devices.device_rows import FREE, NO_NODE, NUMA_NODE, C, HeldDevice, state_is
from hostdev.mgmt.devices.pci_devices import InsufficientDevices, claim_devices, reserve_devices
from hostdev.mgmt.persistence.database import PreparedStatement

#: number of requested names -> free devices of each name per node, by node.
_BY_NODE: dict[int, PreparedStatement] = {}


def _by_node_statement(names: int) -> PreparedStatement:
    statement = _BY_NODE.get(names)
    if statement is None:
        counts = [func.sum(case((C.name == bindparam(f"name_{i}"), 1), else_=0))
                  for i in range(names)]
        wanted: list[BindParameter[str]] = [bindparam(f"name_{i}") for i in range(names)]
        statement = PreparedStatement(
            select(NUMA_NODE, *counts)
            .where(C.host_id == bindparam("host_id"), state_is(FREE), C.name.in_(wanted))
            .group_by(NUMA_NODE).order_by(NUMA_NODE))
        _BY_NODE[names] = statement
    return statement


def free_by_node(conn: Connection, host_id: int,
                 names: Sequence[str]) -> dict[int, tuple[int, ...]]:
    """Returns, per NUMA node of a host, the free devices of each of ``names`` (in order)."""
    params: dict[str, Any] = {f"name_{i}": name for i, name in enumerate(names)}
    params["host_id"] = host_id
    rows = _by_node_statement(len(names)).execute(conn, params).rows
    return {int(row[0]): tuple(int(n or 0) for n in row[1:]) for row in rows}


def fitting_nodes(by_node: Mapping[int, Sequence[int]], counts: Sequence[int],
                  prefer: int | None = None) -> list[int]:
    """Returns the nodes with ``counts[i]`` of every name: ``prefer`` first if it has, then
    the others in order."""
    fitting = [node for node, free in sorted(by_node.items())
               if all(f >= c for f, c in zip(free, counts, strict=True))]
    if prefer in fitting:
        fitting.remove(prefer)
        fitting.insert(0, prefer)
    return fitting


@dataclass(frozen=True)
class _Choice:
    """The requested (name, count) pairs by name, each node's free devices of them, and the
    nodes that have them by count, the one to take on first."""

    wanted: list[tuple[str, int]]
    by_node: dict[int, tuple[int, ...]]
    nodes: list[int]

    @property
    def node(self) -> int | None:
        return self.nodes[0] if self.nodes else None


def _choose(conn: Connection, host_id: int, requests: Mapping[str, int],
            prefer: int | None) -> _Choice:
    wanted = sorted((name, count) for name, count in requests.items() if count)
    by_node = free_by_node(conn, host_id, [name for name, _ in wanted])
    return _Choice(wanted, by_node, fitting_nodes(by_node, [c for _, c in wanted], prefer))


def node_for(conn: Connection, host_id: int, requests: Mapping[str, int], policy: NumaPolicy,
             prefer: int | None = None) -> int | None:
    """Returns the node :func:`take_on_node` would take on (None: anywhere), taking nothing."""
    if policy == "none" or not any(requests.values()):
        return None
    return _choose(conn, host_id, requests, prefer).node


def take_on_node(conn: Connection, vm_id: int, host_id: int, requests: Mapping[str, int],
                 policy: NumaPolicy, *, reserve: bool = False, prefer: int | None = None,
                 ) -> tuple[tuple[HeldDevice, ...], int | None]:
    """Claims (or reserves) a VM's devices on one host by ``policy``.

    Returns the devices and the NUMA node they are all on (None when they
    are spread, the policy is ``none``, or the host reports no node).

    Raises:
        InsufficientDevices: too few free devices, or, under ``required``, no
            node has them all (the text says what each node has) or the host's
            hardware rules refuse them on every node that has them (the first
            node's refusal).
        ClaimRaceLost: as :func:`~hostdev.mgmt.devices.pci_devices.claim_devices`.
    """
    take = reserve_devices if reserve else claim_devices
    if policy == "none" or not any(requests.values()):
        return take(conn, vm_id, host_id, requests), None
    choice = _choose(conn, host_id, requests, prefer)
    refused: InsufficientDevices | None = None
    # A node with the devices by count may still be refused by the host's hardware rules
    # (a PF with its own VF, part of an IOMMU group): then the next one. A refusal writes
    # nothing, so the next try starts clean.
    for node in choice.nodes:
        try:
            held = take(conn, vm_id, host_id, requests, numa_node=node)
        except InsufficientDevices as exc:
            refused = refused or exc
        else:  # devices of a host without NUMA are not on a node the guest can be bound to
            return held, (node if node != NO_NODE else None)
    if policy == "required":
        raise refused or _no_node(host_id, choice.wanted, choice.by_node)
    return take(conn, vm_id, host_id, requests), None


def _no_node(host_id: int, wanted: Sequence[tuple[str, int]],
             by_node: Mapping[int, Sequence[int]]) -> InsufficientDevices:
    """Says that no node has every name, and what each node has."""
    def has(free: Sequence[int]) -> str:
        return " ".join(f"{f}x{name}" for f, (name, _) in zip(free, wanted, strict=True))
    found = ", ".join(f"node {node} has {has(free)}" for node, free in sorted(by_node.items()))
    index = next((i for i, (_, count) in enumerate(wanted)
                  if max((free[i] for free in by_node.values()), default=0) < count), 0)
    name, count = wanted[index]
    return InsufficientDevices(
        f"host {host_id}: no NUMA node has {' and '.join(f'{c}x{n}' for n, c in wanted)} "
        f"free ({found or 'none has any'}); the offering's NUMA policy is required: "
        "pick another host or free devices", host_id=host_id, name=name, wanted=count,
        free=max((free[index] for free in by_node.values()), default=0))


def node_of_held(conn: Connection, vm_id: int, host_id: int) -> int | None:
    """Returns the NUMA node a VM's devices on a host share; None if several, or none known.

    For a VM that got its devices without a claim (found running by its host).
    """
    nodes = set(conn.scalars(select(C.numa_node).distinct()
                             .where(C.host_id == host_id, C.instance_id == vm_id)))
    return nodes.pop() if len(nodes) == 1 else None
