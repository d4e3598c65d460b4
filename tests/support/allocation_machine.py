"""A hypothesis state machine over the daemon's allocation, checking the hardware rules.

Random inventories (IOMMU groups, PF/VF trees, NUMA nodes, withheld devices)
on two hosts, and random streams of deploys (claims), stops (releases),
migrations (reserve, then commit or abort), disables and enables, and agent
reports that withhold a device or stop withholding it, and hosts put into
maintenance (every VM migrated off or stopped). Deploys and migrations draw a
NUMA policy. Beside them, VMs of an offering without devices go through the
VM lifecycle (every event, starts placed on a drawn host, committed
migrations): each host's ``used_cpus`` and ``used_memory_mb`` stay the sums
over its VMs in ``HOLDS_DEVICES`` states. After every step the rows are
read once (``Snapshot``) and every check in ``INVARIANTS`` runs on them; a
VM placed under ``required`` holds devices of one NUMA node on each host.

Extending it: a new rule is a method decorated with ``@rule`` in a subclass
(or here); a new invariant is a function ``(Snapshot) -> None`` appended to
``INVARIANTS`` (e.g. NUMA ``required`` honoured: read ``Snapshot.vms``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sqlalchemy import Engine, delete, func, select, update

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DeviceState, NumaPolicy, PciDeviceInfo
from hostdev.mgmt.devices.availability import HELD_STATES, DeviceFacts, rule_changes
from hostdev.mgmt.devices.device_admin import DeviceBusy
from hostdev.mgmt.devices.pci_devices import InsufficientDevices
from hostdev.mgmt.persistence.database import transaction
from hostdev.mgmt.persistence.models import DEVICE_STATES, Host, HostBlock, PciDevice, VmInstance
from hostdev.mgmt.persistence.unit_of_work import TxContext, UnitOfWork
from hostdev.mgmt.placement import blocks
from hostdev.mgmt.vms import capacity
from hostdev.mgmt.vms.vm_lifecycle import PciDeviceManager, VmLifecycleManager
from hostdev.mgmt.vms.vm_states import HOLDS_DEVICES, VmEvent, is_allowed
from tests.support.databases import add_host, add_offering, add_vms, uncovered_hosts
from tests.support.pci_device_contract import ClaimPath

NAMES = ("A", "B")
POLICIES: tuple[NumaPolicy, ...] = ("none", "preferred", "required")
HOSTS = 2
VMS = 4
#: VMs moved through the VM lifecycle; their offering asks for no devices.
LIFECYCLE_VMS = 3


@st.composite
def inventories(draw: st.DrawFn) -> list[PciDeviceInfo]:
    """Draws one host's report: up to 8 devices in groups, PF/VF trees, on NUMA nodes."""
    devices: list[PciDeviceInfo] = []
    nodes = st.none() | st.integers(0, 1)
    group_nodes: dict[int, int | None] = {}  # the functions of a group sit on one node
    for number in range(draw(st.integers(1, 8))):
        pfs = [d.address for d in devices if d.physical_function is None]
        group = draw(st.none() | st.integers(0, 2))
        node = draw(nodes) if group is None else group_nodes.setdefault(group, draw(nodes))
        devices.append(PciDeviceInfo(
            address=PciAddress(f"{0x10 + number:02x}:00.0"), name=draw(st.sampled_from(NAMES)),
            iommu_group=group, numa_node=node,
            physical_function=draw(st.none() | st.sampled_from(pfs)) if pfs else None,
            withheld="partial group" if draw(st.integers(0, 9)) == 0 else ""))
    return devices


@dataclass(frozen=True)
class Row:
    """One device row as the invariants read it."""

    id: int
    host_id: int
    address: PciAddress
    name: str
    state: DeviceState
    holder: int | None
    iommu_group: int | None
    physical_function: PciAddress | None
    numa_node: int | None
    reason: str
    withheld: str


@dataclass
class Snapshot:
    """Every device row of the machine's hosts, and its VMs' rows, read after a step."""

    rows: list[Row]
    vms: dict[int, tuple[str, int | None]] = field(default_factory=dict)

    def on(self, host_id: int) -> list[Row]:
        """Returns the rows of one host."""
        return [r for r in self.rows if r.host_id == host_id]

    def facts(self, host_id: int) -> list[DeviceFacts]:
        """Returns a host's rows as the hardware rules read them."""
        return [DeviceFacts(id=r.id, address=r.address, name=r.name, state=r.state,
                            iommu_group=r.iommu_group, physical_function=r.physical_function,
                            withheld=r.withheld, reason=r.reason, numa_node=r.numa_node,
                            holder=self.vms.get(r.holder or 0, ("", None))[0])
                for r in self.on(host_id)]


def no_group_is_split_between_vms(snapshot: Snapshot) -> None:
    """The held members of an IOMMU group all belong to one VM."""
    holders: dict[tuple[int, int], set[int]] = {}
    for row in snapshot.rows:
        if row.iommu_group is not None and row.state in HELD_STATES and row.holder:
            holders.setdefault((row.host_id, row.iommu_group), set()).add(row.holder)
    split = {group: vms for group, vms in holders.items() if len(vms) > 1}
    assert not split, f"IOMMU groups held by several VMs: {split}"


def no_pf_is_held_with_one_of_its_vfs(snapshot: Snapshot) -> None:
    """Never a PF held (by anyone) while one of its VFs is held (by anyone)."""
    held = {(r.host_id, r.address) for r in snapshot.rows if r.state in HELD_STATES}
    both = [r.address for r in snapshot.rows if r.state in HELD_STATES
            and r.physical_function is not None and (r.host_id, r.physical_function) in held]
    assert not both, f"VFs held with their PF: {both}"


def counts_add_up(snapshot: Snapshot) -> None:
    """Every device is in exactly one known state; the states add up to the inventory."""
    by_state = Counter(r.state for r in snapshot.rows)
    assert set(by_state) <= set(DEVICE_STATES), by_state
    in_inventory = [r for r in snapshot.rows if r.state != "removed"]
    assert sum(n for s, n in by_state.items() if s != "removed") == len(in_inventory)


def rows_are_a_fixed_point_of_the_rules(snapshot: Snapshot) -> None:
    """No free device is kept by a rule, no unavailable one is free to go, reasons are current."""
    for host_id in sorted({r.host_id for r in snapshot.rows}):
        changes = rule_changes(snapshot.facts(host_id))
        assert not changes.unavailable and not changes.free, (host_id, changes)


def reasons_explain_unavailable_devices(snapshot: Snapshot) -> None:
    """An unavailable device says why; a free one carries no stale reason."""
    for row in snapshot.rows:
        if row.state == "unavailable":
            assert row.reason, row
        if row.state == "free":
            assert row.reason == "", row


def holders_match_states(snapshot: Snapshot) -> None:
    """Held states have a VM, free, unavailable and disabled ones none."""
    for row in snapshot.rows:
        assert (row.holder is not None) == (row.state in ("allocated", "reserved",
                                                          "quarantined")), row


#: What must hold after every step; other rules append theirs (NUMA, maintenance).
INVARIANTS: list[Callable[[Snapshot], None]] = [
    no_group_is_split_between_vms, no_pf_is_held_with_one_of_its_vfs, counts_add_up,
    rows_are_a_fixed_point_of_the_rules, reasons_explain_unavailable_devices,
    holders_match_states,
]


class AllocationMachine(RuleBasedStateMachine):
    """Deploys, stops, migrations, disables, enables and reports on two random hosts."""

    engine: ClassVar[Engine]

    def __init__(self) -> None:
        super().__init__()
        self.repo = ClaimPath(self.engine)
        with transaction(self.engine) as conn:
            # Earlier examples' hosts go Down and their blocks away: the blocks hold what
            # this example's hosts did, not what a neighbour's room hides.
            conn.execute(update(Host).values(status="Down"))
            conn.execute(delete(HostBlock))
            self.hosts = [add_host(conn) for _ in range(HOSTS)]
            self.vms = add_vms(conn, add_offering(conn), VMS)
            self.lifecycle_vms = add_vms(conn, add_offering(conn), LIFECYCLE_VMS)
            for size, vm_id in enumerate(self.lifecycle_vms, start=1):  # each its own size
                conn.execute(update(VmInstance).where(VmInstance.id == vm_id)
                             .values(cpus=size, memory_mb=1000 * size))
        self.lifecycle = VmLifecycleManager([PciDeviceManager()])
        self.work = UnitOfWork(self.engine)
        self.reports: dict[int, list[PciDeviceInfo]] = {}
        #: VM -> (host it runs on, what it asked for, NUMA policy); absent when stopped.
        self.placed: dict[int, tuple[int, dict[str, int], NumaPolicy]] = {}
        #: VM -> host its devices are reserved on while it migrates.
        self.migrating: dict[int, int] = {}

    @initialize(reports=st.lists(inventories(), min_size=HOSTS, max_size=HOSTS))
    def report_inventories(self, reports: list[list[PciDeviceInfo]]) -> None:
        """Each host's agent reports its devices."""
        for host, report in zip(self.hosts, reports, strict=True):
            self.reports[host] = report
            self.repo.reconcile(host, report)

    def snapshot(self) -> Snapshot:
        """Reads every device row of the machine's hosts, and its VMs."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(PciDevice.__table__)
                                .where(PciDevice.host_id.in_(self.hosts))).all()
            vms = {vm_id: (name, host) for vm_id, name, host in conn.execute(
                select(VmInstance.id, VmInstance.name, VmInstance.host_id)
                .where(VmInstance.id.in_(self.vms)))}
        return Snapshot(rows=[Row(
            id=r.id, host_id=r.host_id,
            address=PciAddress(f"{r.domain}:{r.bus}:{r.slot}.{r.function}"), name=r.name,
            state=r.state, holder=r.instance_id or r.reserved_for, iommu_group=r.iommu_group,
            physical_function=PciAddress(r.physical_function) if r.physical_function else None,
            numa_node=r.numa_node, reason=r.reason, withheld=r.withheld) for r in rows], vms=vms)

    def _stopped(self) -> list[int]:
        return [vm for vm in self.vms if vm not in self.placed]

    def _running(self) -> list[int]:
        return [vm for vm in self.vms if vm in self.placed and vm not in self.migrating]

    def _explained_refusal(self, host: int, requests: Mapping[str, int],
                           policy: NumaPolicy = "none") -> None:
        """A refused claim is short of free devices (on every node, under ``required``),
        or the host has a free PF with a free VF."""
        rows = [r for r in self.snapshot().on(host) if r.state == "free"]
        addresses = {r.address for r in rows}
        nodes = {-1 if r.numa_node is None else r.numa_node for r in rows} or {-1}
        scopes = [[r for r in rows if (-1 if r.numa_node is None else r.numa_node) == node]
                  for node in nodes] if policy == "required" else [rows]
        short = all(any(Counter(r.name for r in scope)[name] < count
                        for name, count in requests.items()) for scope in scopes)
        assert short or any(r.physical_function in addresses for r in rows), (requests, rows)

    @precondition(lambda self: self._stopped())
    @rule(data=st.data(), host=st.integers(0, HOSTS - 1),
          requests=st.dictionaries(st.sampled_from(NAMES), st.integers(1, 2), min_size=1),
          policy=st.sampled_from(POLICIES))
    def deploy(self, data: st.DataObject, host: int, requests: dict[str, int],
               policy: NumaPolicy) -> None:
        """A stopped VM is deployed: its devices are claimed, whole groups at a time."""
        vm, host_id = data.draw(st.sampled_from(self._stopped())), self.hosts[host]
        before = self.snapshot().on(host_id)
        try:
            held = self.repo.claim(vm, host_id, requests, policy)
        except InsufficientDevices:
            self._explained_refusal(host_id, requests, policy)
            return
        got = Counter(d.name for d in held)
        assert all(got[name] >= count for name, count in requests.items()), (got, requests)
        groups = {r.iommu_group for r in before if r.id in {d.id for d in held}} - {None}
        mates = {r.id for r in before if r.iommu_group in groups and r.state != "removed"}
        assert mates <= {d.id for d in held}, "a claim took part of an IOMMU group"
        self.placed[vm] = (host_id, requests, policy)

    @precondition(lambda self: self.placed)
    @rule(data=st.data())
    def stop(self, data: st.DataObject) -> None:
        """A VM stops: everything it holds or reserved is let go."""
        vm = data.draw(st.sampled_from(sorted(self.placed)))
        held = self.repo.devices_of(vm)
        assert self.repo.release(vm) == len(held)
        del self.placed[vm]
        self.migrating.pop(vm, None)

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def begin_migration(self, data: st.DataObject) -> None:
        """A running VM reserves its devices on the other host."""
        vm = data.draw(st.sampled_from(self._running()))
        self._reserve_elsewhere(vm)

    def _reserve_elsewhere(self, vm: int) -> bool:
        """Reserves a running VM's devices on the other host; False when they do not fit."""
        source, requests, policy = self.placed[vm]
        target = next(h for h in self.hosts if h != source)
        try:
            self.repo.reserve(vm, target, requests, policy)
        except InsufficientDevices:
            self._explained_refusal(target, requests, policy)
            return False
        self.migrating[vm] = target
        return True

    @precondition(lambda self: self.migrating)
    @rule(data=st.data(), success=st.booleans())
    def end_migration(self, data: st.DataObject, success: bool) -> None:
        """A migration commits (the VM moves) or aborts (it keeps its source set)."""
        vm = data.draw(st.sampled_from(sorted(self.migrating)))
        target = self.migrating.pop(vm)
        source, requests, policy = self.placed[vm]
        if success:
            self.repo.commit_migration(vm, source, target)
            self.placed[vm] = (target, requests, policy)
        else:
            self.repo.abort_migration(vm, target)
        assert {d.host_id for d in self.repo.devices_of(vm)} <= {self.placed[vm][0]}

    @rule(data=st.data(), enable=st.booleans())
    def disable_or_enable(self, data: st.DataObject, enable: bool) -> None:
        """An operator disables a device no VM holds (refused otherwise), or enables one."""
        row = data.draw(st.sampled_from([r for r in self.snapshot().rows
                                         if r.state != "removed"]))
        if enable:
            state = self.repo.enable(row.id)
            assert state != "disabled"
        elif row.state in ("free", "unavailable", "disabled"):
            assert self.repo.disable(row.id) == "disabled"
        else:
            with pytest.raises(DeviceBusy):
                self.repo.disable(row.id)

    @rule(host=st.integers(0, HOSTS - 1), data=st.data())
    def withhold_or_offer(self, host: int, data: st.DataObject) -> None:
        """An agent restarts and withholds one of its devices, or stops withholding it."""
        host_id = self.hosts[host]
        report = self.reports[host_id]
        index = data.draw(st.integers(0, len(report) - 1))
        device = report[index]
        flipped = "" if device.withheld else "partial group"
        report[index] = PciDeviceInfo(
            address=device.address, name=device.name, iommu_group=device.iommu_group,
            numa_node=device.numa_node, physical_function=device.physical_function,
            withheld=flipped)
        self.repo.reconcile(host_id, report)

    @rule(host=st.integers(0, HOSTS - 1))
    def maintenance(self, host: int) -> None:
        """A host goes into maintenance: its VMs migrate off, or stop when they do not fit."""
        host_id = self.hosts[host]
        for vm in sorted(vm for vm, target in self.migrating.items() if target == host_id):
            self.repo.abort_migration(vm, self.migrating.pop(vm))
        for vm in sorted(vm for vm, placed in self.placed.items() if placed[0] == host_id):
            if vm in self.migrating or self._reserve_elsewhere(vm):
                target = self.migrating.pop(vm)
                source, requests, policy = self.placed[vm]
                self.repo.commit_migration(vm, source, target)
                self.placed[vm] = (target, requests, policy)
            else:
                self.repo.release(vm)
                del self.placed[vm]
        left = [r for r in self.snapshot().on(host_id) if r.holder is not None]
        assert not left, f"devices still held on a host in maintenance: {left}"

    @rule(data=st.data(), event=st.sampled_from(list(VmEvent)), host=st.integers(0, HOSTS - 1))
    def vm_event(self, data: st.DataObject, event: VmEvent, host: int) -> None:
        """A lifecycle VM meets an event; a start, or a report finding it running, places it
        on ``host``. An event its state does not allow changes nothing."""
        vm_id = data.draw(st.sampled_from(self.lifecycle_vms))

        def work(tx: TxContext) -> None:
            vm = tx.session.get(VmInstance, vm_id)
            assert vm is not None
            if not is_allowed(vm.state, event):
                return
            if event in (VmEvent.START_REQUESTED, VmEvent.FOLLOW_AGENT_POWER_ON):
                self.lifecycle.transition(tx, vm, event, host_id=self.hosts[host])
            else:
                self.lifecycle.transition(tx, vm, event)
        self.work.run(work, what="vm event")

    @rule(data=st.data())
    def vm_migration_commits(self, data: st.DataObject) -> None:
        """A migrating lifecycle VM moves to the other host, as a committed migration does."""
        vm_id = data.draw(st.sampled_from(self.lifecycle_vms))

        def work(tx: TxContext) -> None:
            vm = tx.session.get(VmInstance, vm_id)
            assert vm is not None
            if vm.state == "Migrating" and vm.host_id is not None:
                target = next(h for h in self.hosts if h != vm.host_id)
                assert capacity.move_to_host(tx.connection, vm, target, None)
        self.work.run(work, what="migration commit")

    @invariant()
    def hosts_hold_what_their_vms_hold(self) -> None:
        """Each host's ``used_cpus``/``used_memory_mb`` are the sums over its VMs in
        ``HOLDS_DEVICES`` states."""
        with self.engine.connect() as conn:
            used = {h: (c, m) for h, c, m in conn.execute(
                select(Host.id, Host.used_cpus, Host.used_memory_mb)
                .where(Host.id.in_(self.hosts)))}
            sums = {h: (int(c), int(m)) for h, c, m in conn.execute(
                select(VmInstance.host_id, func.sum(VmInstance.cpus),
                       func.sum(VmInstance.memory_mb))
                .where(VmInstance.host_id.in_(self.hosts),
                       VmInstance.state.in_(HOLDS_DEVICES))
                .group_by(VmInstance.host_id))}
        assert used == {h: sums.get(h, (0, 0)) for h in self.hosts}

    @rule()
    def tighten_blocks(self) -> None:
        """Placement's blocks are recomputed from the hosts (a daemon's periodic task)."""
        self.work.run(lambda tx: blocks.tighten(tx.connection, 0), what="tighten blocks")

    @invariant()
    def every_up_host_is_in_a_block_that_may_fit_it(self) -> None:
        """Each Up host's block has the bit of its (free CPUs, free memory) cell or of one
        above it in both, so placement's search never skips it."""
        with self.engine.connect() as conn:
            assert uncovered_hosts(conn) == []

    @invariant()
    def required_vms_stay_on_one_numa_node(self) -> None:
        """A VM placed under ``required`` holds devices of one NUMA node on each host."""
        if not self.reports:
            return
        rows = self.snapshot().rows
        for vm, (_, _, policy) in self.placed.items():
            if policy == "required":
                for host_id in self.hosts:
                    nodes = {r.numa_node for r in rows if r.holder == vm and r.host_id == host_id}
                    assert len(nodes) <= 1, (vm, host_id, nodes)

    @invariant()
    def hardware_rules_hold(self) -> None:
        """Every invariant in INVARIANTS holds on the rows after the step."""
        if not self.reports:
            return  # before the inventories are reported
        snapshot = self.snapshot()
        for check in INVARIANTS:
            check(snapshot)
