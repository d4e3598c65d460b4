"""Random hosts and demands for checking placement's SQL search against its verdicts.

Hosts carry hardware relations: IOMMU groups, PF/VF trees, withheld devices.
Each device is drawn with the state a VM or an operator gave it; the free
ones then take the state the hardware rules give them (free or unavailable,
``availability.blocked``), as the daemon keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st
from sqlalchemy import Engine, delete, insert
from sqlalchemy.orm import Session

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import NumaPolicy, PciRequest
from hostdev.mgmt.devices.availability import RULED_STATES, DeviceFacts, blocked
from hostdev.mgmt.persistence.models import (
    DEVICE_STATES,
    HOST_STATUSES,
    NUMA_POLICIES,
    VM_STATES,
    Host,
    HostBlock,
    PciDevice,
    ServiceOffering,
    VmInstance,
)
from hostdev.mgmt.placement import blocks, planner
from hostdev.mgmt.placement.planner import Demand
from hostdev.mgmt.vms.vm_states import HOLDS_DEVICES

NAMES = ("10GE", "GPU", "FPGA")


@dataclass(frozen=True)
class DeviceSpec:
    """One device: name, drawn state, NUMA node, IOMMU group, its PF's index, withheld or not."""

    name: str
    state: str
    node: int | None = None
    group: int | None = None
    pf: int | None = None
    withheld: bool = False

    @staticmethod
    def address(number: int) -> PciAddress:
        """Returns the address of a host's device ``number``."""
        return PciAddress(f"28:{number:02x}.0")


@dataclass(frozen=True)
class HostSpec:
    """One host to insert: its resources, its devices and its VMs."""

    status: str
    cpus: int
    memory_mb: int
    devices: tuple[DeviceSpec, ...]
    vms: tuple[tuple[int, int, str], ...]

    def facts(self) -> list[DeviceFacts]:
        """Returns its devices as the hardware rules read them (ids are indexes)."""
        return [DeviceFacts(id=n, address=DeviceSpec.address(n), name=d.name, state=d.state,
                            iommu_group=d.group, numa_node=d.node,
                            withheld="partial group" if d.withheld else "",
                            physical_function=(DeviceSpec.address(d.pf) if d.pf is not None
                                               else None), holder="vm" if d.state in (
                                "allocated", "reserved", "quarantined") else "")
                for n, d in enumerate(self.devices)]

    def ruled_states(self) -> list[tuple[str, str]]:
        """Returns (state, reason) of each device once the hardware rules are applied."""
        reasons = blocked(self.facts())
        return [(("unavailable", reasons[n]) if n in reasons else ("free", ""))
                if d.state in RULED_STATES else (d.state, "")
                for n, d in enumerate(self.devices)]


@st.composite
def _devices(draw: st.DrawFn) -> tuple[DeviceSpec, ...]:
    """Draws up to 8 devices, some sharing IOMMU groups, some VFs of earlier PFs."""
    devices: list[DeviceSpec] = []
    for number in range(draw(st.integers(0, 8))):
        pfs = [n for n, d in enumerate(devices) if d.pf is None]
        devices.append(DeviceSpec(
            # Free half the time, so hosts often fit and rules often bite.
            name=draw(st.sampled_from(NAMES)),
            state=draw(st.just("free") | st.sampled_from(DEVICE_STATES)),
            node=draw(st.sampled_from((None, 0, 1, 2))),
            group=draw(st.none() | st.integers(0, 3)),
            pf=draw(st.none() | st.sampled_from(pfs)) if pfs and number else None,
            withheld=draw(st.integers(0, 9)) == 0))
    return tuple(devices)


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
    devices=_devices(),
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


#: One or two names, one or two devices each: demands a host of 8 devices often meets.
_small_demands = st.builds(Demand, cpus=st.just(1), memory_mb=st.just(0), pci=st.lists(
    st.sampled_from(NAMES), unique=True, min_size=1, max_size=2).flatmap(
    lambda names: st.tuples(*(st.builds(PciRequest, name=st.just(name),
                                        count=st.integers(1, 2)) for name in names))))
#: Up hosts with room to spare and no VMs: only their devices decide whether they fit.
_roomy_hosts = st.builds(HostSpec, status=st.just("Up"), cpus=st.just(64),
                         memory_mb=st.just(65536), devices=_devices(), vms=st.just(()))


@st.composite
def worlds(draw: st.DrawFn, max_hosts: int = 8, numa: NumaPolicy | None = None, *,
           roomy: bool = False) -> World:
    """Draws hosts, a demand (with the NUMA policy ``numa``, or any), and an avoid set.

    The avoid set holds some of the hosts' names and guids. ``roomy`` draws
    hosts whose devices alone decide (Up, room, no VMs), a small demand with
    no NUMA policy, and no avoid set.
    """
    hosts = tuple(draw(st.lists(_roomy_hosts if roomy else _hosts, max_size=max_hosts)))
    if roomy:
        return World(hosts=hosts, demand=draw(_small_demands), avoid=frozenset())
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
        for model in (PciDevice, VmInstance, ServiceOffering, Host, HostBlock):
            conn.execute(delete(model))
        offering = conn.execute(insert(ServiceOffering).values(
            name="any", cpus=1, memory_mb=1024)).inserted_primary_key[0]
        for index, spec in enumerate(world.hosts):
            holding = [(cpus, memory) for cpus, memory, state in spec.vms
                       if state in HOLDS_DEVICES]  # what hostdev.mgmt.vms.capacity keeps
            host_id = conn.execute(insert(Host).values(
                guid=f"guid-{index}", name=f"h{index}", status=spec.status, cpus=spec.cpus,
                memory_mb=spec.memory_mb, used_cpus=sum(c for c, _ in holding),
                used_memory_mb=sum(m for _, m in holding),
                hypervisor_version="")).inserted_primary_key[0]
            blocks.raise_host(conn, host_id)  # as its registration would
            for number, (device, (state, reason)) in enumerate(zip(
                    spec.devices, spec.ruled_states(), strict=True)):
                pf = device.pf
                conn.execute(insert(PciDevice).values(
                    host_id=host_id, name=device.name, domain="0000", bus="28",
                    slot=f"{number:02x}", function="0", state=state, reason=reason,
                    numa_node=device.node, iommu_group=device.group,
                    withheld="partial group" if device.withheld else "",
                    physical_function=str(DeviceSpec.address(pf)) if pf is not None else None))
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
