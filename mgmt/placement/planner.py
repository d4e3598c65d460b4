"""First-fit placement: one fit rule, as an SQL search (``search``) and as per-host verdicts."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from hostdev.messages.values import HostStatus, HostVerdict
from hostdev.mgmt.api.offerings import describe_pci_requests
from hostdev.mgmt.devices import host_rules
from hostdev.mgmt.devices.availability import choose
from hostdev.mgmt.devices.device_rows import FREE, NO_NODE, NUMA_NODE
from hostdev.mgmt.devices.pci_devices import insufficient
from hostdev.mgmt.persistence.models import Host, PciDevice

# Callers take the demand, the search and what verdicts quote from here.
from hostdev.mgmt.placement.demand import PLACEABLE as PLACEABLE
from hostdev.mgmt.placement.demand import Candidate as Candidate
from hostdev.mgmt.placement.demand import Demand as Demand
from hostdev.mgmt.placement.search import PAGE as PAGE
from hostdev.mgmt.placement.search import find_hosts as find_hosts
from hostdev.mgmt.placement.search import search_hosts as search_hosts
from hostdev.mgmt.placement.unavailable import Unavailable as Unavailable
from hostdev.mgmt.placement.unavailable import read_unavailable


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


def read_capacities(session: Session, names: Sequence[str]) -> list[HostCapacity]:
    """Reads every host's status, free CPU/memory and free devices of ``names``."""
    # The columns the search reads (``hostdev.mgmt.vms.capacity`` keeps ``used_*``).
    rows = session.execute(
        select(Host.id, Host.guid, Host.name, Host.status,
               (Host.cpus - Host.used_cpus).label("free_cpus"),
               (Host.memory_mb - Host.used_memory_mb).label("free_memory"))
        .order_by(Host.id)).all()
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
    """Returns a verdict per host, in first-fit order.

    A host that fits by count but whose device rules refuse the claim (a PF
    with its own VF) is rejected with the claim's reason, as a deploy is.
    """
    names = [request.name for request in demand.pci]
    verdicts = [verdict(host, demand, avoid) for host in read_capacities(session, names)]
    fitting = [v for v in verdicts if v.accepted]
    if not demand.pci or not fitting:
        return verdicts
    ruled = dict(session.execute(select(Host.guid, Host.id).where(
        Host.guid.in_([v.host_guid for v in fitting]), Host.device_rules.is_(True))).all())
    requests = {request.name: request.count for request in demand.pci}
    for index, found in enumerate(verdicts):
        host_id = ruled.get(found.host_guid)
        if host_id is None:
            continue
        facts = host_rules.read_facts(session.connection(), host_id)
        # Under ``required`` the devices must come from one node: any node will do here.
        nodes: list[int | None] = [None]
        if demand.numa == "required":
            nodes = [*sorted({f.numa_node if f.numa_node is not None else NO_NODE
                              for f in facts})]
        shorts = [choose(facts, requests, node).short for node in nodes]
        if None not in shorts:
            name, wanted, free = cast(tuple[str, int, int], shorts[0])
            refused = insufficient(host_id, name, wanted, free, by_rules=True)
            verdicts[index] = HostVerdict(host_guid=found.host_guid, host_name=found.host_name,
                                          accepted=False, reason=refused.detail)
    return verdicts


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


