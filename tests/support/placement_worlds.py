"""Random hosts and demands for checking placement's SQL search against its verdicts."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st
from sqlalchemy import Engine, delete, insert
from sqlalchemy.orm import Session

from hostdev.messages.values import NumaPolicy, PciRequest
from hostdev.mgmt.persistence.models import (
    DEVICE_STATES,
    HOST_STATUSES,
    NUMA_POLICIES,
    VM_STATES,
    Host,
    PciDevice,
    ServiceOffering,
    VmInstance,
)
from hostdev.mgmt.placement import planner
from hostdev.mgmt.placement.planner import Demand

NAMES = ("10GE", "GPU", "FPGA")


@dataclass(frozen=True)
class HostSpec:
    """One host to insert: its resources, its devices (name, state, NUMA node) and its VMs."""

    status: str
    cpus: int
    memory_mb: int
    devices: tuple[tuple[str, str, int | None], ...]
    vms: tuple[tuple[int, int, str], ...]


@dataclass(frozen=True)
class World:
    """Hosts ``h0``, ``h1``... (guids ``guid-0``...), a demand and an avoid set."""

    hosts: tuple[HostSpec, ...]
    demand: Demand
    avoid: frozenset[str]


_hosts = st.builds(
    HostSpec,
    status=st.one_of(st.just("Up"), st.sampled_from(HOST_STATUSES)),
    cpus=st.integers(0, 8),
    memory_mb=st.integers(0, 4).map(lambda n: n * 1024),
    # Free half the time, so hosts often have enough devices and the NUMA
    # criterion, not the count, decides.
    devices=st.lists(st.tuples(st.sampled_from(NAMES),
                               st.one_of(st.just("free"), st.sampled_from(DEVICE_STATES)),
                               st.sampled_from((None, 0, 1, 2))),
                     max_size=10).map(tuple),
    vms=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2).map(lambda n: n * 1024),
                           st.sampled_from(VM_STATES)), max_size=3).map(tuple),
)
_requests = st.lists(st.sampled_from(NAMES), unique=True, max_size=3).flatmap(
    lambda names: st.tuples(*(st.builds(PciRequest, name=st.just(name),
                                        count=st.integers(1, 3)) for name in names)))
def _demands(numa: st.SearchStrategy[NumaPolicy], most: int) -> st.SearchStrategy[Demand]:
    return st.builds(Demand, cpus=st.integers(0, most * 2),
                     memory_mb=st.integers(0, most).map(lambda n: n * 1024), pci=_requests,
                     numa=numa)


@st.composite
def worlds(draw: st.DrawFn, max_hosts: int = 8, numa: NumaPolicy | None = None) -> World:
    """Draws hosts, a demand (with the NUMA policy ``numa``, or any), and an avoid set.

    The avoid set holds some of the hosts' names and guids.
    """
    hosts = tuple(draw(st.lists(_hosts, max_size=max_hosts)))
    refs = [f"h{i}" for i in range(len(hosts))] + [f"guid-{i}" for i in range(len(hosts))]
    avoid = draw(st.frozensets(st.sampled_from([*refs, "h-unknown"]), max_size=3))
    if numa is None:
        demand = draw(_demands(st.sampled_from(NUMA_POLICIES), most=3))
    else:  # small demands, so that the devices, and their nodes, decide
        demand = draw(_demands(st.just(numa), most=1))
    return World(hosts=hosts, demand=demand, avoid=avoid)


def load(engine: Engine, world: World) -> None:
    """Replaces every host, device and VM in the database with the world's."""
    with engine.begin() as conn:
        for model in (PciDevice, VmInstance, ServiceOffering, Host):
            conn.execute(delete(model))
        offering = conn.execute(insert(ServiceOffering).values(
            name="any", cpus=1, memory_mb=1024)).inserted_primary_key[0]
        for index, spec in enumerate(world.hosts):
            host_id = conn.execute(insert(Host).values(
                guid=f"guid-{index}", name=f"h{index}", status=spec.status, cpus=spec.cpus,
                memory_mb=spec.memory_mb, hypervisor_version="")).inserted_primary_key[0]
            for number, (name, state, node) in enumerate(spec.devices):
                conn.execute(insert(PciDevice).values(
                    host_id=host_id, name=name, domain="0000", bus="28",
                    slot=f"{number:02x}", function="0", state=state, numa_node=node))
            for number, (cpus, memory_mb, state) in enumerate(spec.vms):
                conn.execute(insert(VmInstance).values(
                    uuid=f"{index}-{number}", name=f"vm-{index}-{number}",
                    offering_id=offering, host_id=host_id, state=state, cpus=cpus,
                    memory_mb=memory_mb))


def search_and_verdicts(engine: Engine, world: World,
                        limit: int) -> tuple[list[str], list[str]]:
    """Returns the names ``find_hosts`` finds and the names ``explain`` accepts, in order."""
    with Session(engine) as session:
        found = [c.name for c in planner.find_hosts(session, world.demand,
                                                    avoid=world.avoid, limit=limit)]
        fits = [v.host_name for v in planner.explain(session, world.demand, world.avoid)
                if v.accepted]
    return found, fits
