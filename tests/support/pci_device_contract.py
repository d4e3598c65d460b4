"""The behaviour every database back end must give the daemon's device allocation.

One suite, run twice: ``tests/unit/mgmt/devices/test_pci_devices.py`` subclasses it
on SQLite and ``tests/integration/db/test_pci_devices.py`` on MariaDB. The
subclass's conftest provides an ``engine`` fixture (a migrated database).
``ClaimPath`` drives what the daemon runs: a ``UnitOfWork`` (a new
transaction per attempt, lost races retried), ``PciDeviceManager`` for
claims on Starting and releases, and the ``pci_devices`` functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import pytest
from sqlalchemy import Engine, func, select

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import NumaPolicy, PciDeviceInfo, PciRequest
from hostdev.mgmt.devices import device_admin, pci_devices
from hostdev.mgmt.devices import numa as numa_rules
from hostdev.mgmt.devices.device_admin import DeviceBusy, DeviceNotFound
from hostdev.mgmt.devices.pci_devices import (
    DeviceCounts,
    HeldDevice,
    InsufficientDevices,
    claim_devices,
    device_counts,
    devices_of_vm,
)
from hostdev.mgmt.devices.pci_inventory import InventoryChanges, reconcile_inventory
from hostdev.mgmt.errors import InvalidRequest
from hostdev.mgmt.persistence.database import transaction
from hostdev.mgmt.persistence.models import Host, OutboxEvent, VmInstance
from hostdev.mgmt.persistence.unit_of_work import TxContext, UnitOfWork
from hostdev.mgmt.vms.vm_lifecycle import PciDeviceManager
from tests.support.databases import add_host, add_offering, add_vms

T = TypeVar("T")


class ClaimPath:
    """Each allocation operation as the daemon runs it: one unit of work, lost races retried."""

    def __init__(self, engine: Engine, *, attempts: int = 20) -> None:
        self._work = UnitOfWork(engine)
        self._devices = PciDeviceManager()
        self._attempts = attempts

    def _run(self, what: str, work: Callable[[TxContext], T]) -> T:
        return self._work.run(work, what=what, attempts=self._attempts)

    @staticmethod
    def _vm(vm_id: int) -> VmInstance:
        """The VM as the daemon has it in hand when it claims (read earlier in the transaction)."""
        return VmInstance(id=vm_id, uuid=f"vm-{vm_id}", offering_id=0)

    def claim(self, vm_id: int, host_id: int, requests: Mapping[str, int],
              numa: NumaPolicy = "none") -> tuple[HeldDevice, ...]:
        """Claims as on Starting: ``PciDeviceManager.claim`` with the offering's requests."""
        vm = self._vm(vm_id)
        wanted = tuple(PciRequest(name=name, count=count) for name, count in requests.items())

        def work(tx: TxContext) -> tuple[HeldDevice, ...]:
            # What the deploy's first read leaves in the transaction's caches.
            tx.offering_requests[vm.offering_id] = wanted
            tx.offering_numa[vm.offering_id] = numa
            return self._devices.claim(tx, vm, host_id)
        return self._run("claim devices", work)

    def release(self, vm_id: int, host_id: int | None = None) -> int:
        """Releases as on Stopped (``PciDeviceManager.release``), or on one host only."""
        def work(tx: TxContext) -> int:
            if host_id is not None:
                return len(pci_devices.release_devices(tx.session.connection(), vm_id, host_id))
            return self._devices.release(tx, self._vm(vm_id))
        return self._run("release devices", work)

    def reserve(self, vm_id: int, host_id: int, requests: Mapping[str, int],
                numa: NumaPolicy = "none") -> tuple[HeldDevice, ...]:
        """Reserves a migration's destination set, on one NUMA node as ``numa`` says."""
        return self._run("reserve devices", lambda tx: numa_rules.take_on_node(
            tx.session.connection(), vm_id, host_id, requests, numa, reserve=True)[0])

    def commit_migration(self, vm_id: int, source_host_id: int, destination_host_id: int) -> int:
        """Frees the source set and allocates the destination set."""
        return self._run("commit migration", lambda tx: pci_devices.commit_migration(
            tx.session.connection(), vm_id, source_host_id, destination_host_id))

    def abort_migration(self, vm_id: int, destination_host_id: int) -> int:
        """Frees the destination set."""
        return self._run("abort migration", lambda tx: pci_devices.abort_migration(
            tx.session.connection(), vm_id, destination_host_id))

    def disable(self, device_id: int) -> str:
        """Takes a free device out of service."""
        return self._run("disable device", lambda tx: device_admin.disable_device(
            tx.session.connection(), device_id))

    def enable(self, device_id: int) -> str:
        """Puts a disabled device back in service."""
        return self._run("enable device", lambda tx: device_admin.enable_device(
            tx.session.connection(), device_id))

    def reconcile(self, host_id: int, reported: Iterable[PciDeviceInfo]) -> InventoryChanges:
        """Applies a host's reported inventory, as a start-up does."""
        devices = tuple(reported)
        return self._run("reconcile inventory", lambda tx: reconcile_inventory(
            tx.session.connection(), host_id, devices))

    def counts(self, host_id: int | None = None) -> list[DeviceCounts]:
        """Counts devices per host, name and state."""
        return self._run("count devices", lambda tx: pci_devices.device_counts(
            tx.session.connection(), host_id))

    def devices_of(self, vm_id: int) -> tuple[HeldDevice, ...]:
        """Lists a VM's held, reserved and quarantined devices."""
        return self._run("devices of VM", lambda tx: pci_devices.devices_of_vm(
            tx.session.connection(), vm_id))


def inventory(*specs: str) -> list[PciDeviceInfo]:
    """Builds a reported inventory from ``"28:00.1|10GE"`` strings."""
    devices = []
    for spec in specs:
        address, name = spec.split("|")
        devices.append(PciDeviceInfo(address=PciAddress(address), name=name))
    return devices


STANDARD = inventory("28:00.0|10GE", "28:00.1|10GE", "28:00.2|10GE", "41:00.0|GPU", "41:00.1|GPU")


@dataclass
class World:
    """Two hosts with the STANDARD inventory and four VMs, fresh for each test."""

    repo: ClaimPath
    engine: Engine
    host_a: int
    host_b: int
    vms: list[int]

    def states(self, host_id: int) -> dict[str, tuple[str, int | None]]:
        """Maps each device address on a host to (state, holding VM)."""
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT domain, bus, slot, `function`, state, instance_id, reserved_for "
                f"FROM op_host_pci_devices WHERE host_id = {int(host_id)}"
            ).all()
        return {
            f"{d}:{b}:{s}.{f}": (state, inst if inst is not None else res)
            for d, b, s, f, state, inst, res in rows
        }


class PciDeviceAllocationContract:
    """Claims, releases, migrations, inventory and admin changes, on one back end."""

    @pytest.fixture
    def world(self, engine: Engine) -> Iterator[World]:
        """Creates two hosts with devices and four VMs."""
        repo = ClaimPath(engine)
        with transaction(engine) as conn:
            host_a, host_b = add_host(conn), add_host(conn)
            vms = add_vms(conn, add_offering(conn), 4)
        repo.reconcile(host_a, STANDARD)
        repo.reconcile(host_b, STANDARD)
        yield World(repo, engine, host_a, host_b, vms)

    def test_claim_takes_the_requested_devices(self, world: World) -> None:
        """A claim allocates N devices of each name on the host to the VM."""
        vm = world.vms[0]
        held = world.repo.claim(vm, world.host_a, {"10GE": 2, "GPU": 1})
        assert sorted(d.name for d in held) == ["10GE", "10GE", "GPU"]
        assert {d.state for d in held} == {"allocated"}
        assert {d.host_id for d in held} == {world.host_a}
        assert [d.id for d in world.repo.devices_of(vm)] == sorted(d.id for d in held)

    def test_claim_is_all_or_nothing(self, world: World) -> None:
        """A claim that cannot meet one name allocates nothing and says how many are free."""
        with pytest.raises(InsufficientDevices) as caught:
            world.repo.claim(world.vms[0], world.host_a, {"10GE": 1, "GPU": 3})
        assert (caught.value.name, caught.value.wanted, caught.value.free) == ("GPU", 3, 2)
        assert world.repo.devices_of(world.vms[0]) == ()
        assert {s for s, _ in world.states(world.host_a).values()} == {"free"}

    def test_claims_of_two_vms_never_share_a_device(self, world: World) -> None:
        """Successive claims get disjoint devices until the host runs out."""
        first = world.repo.claim(world.vms[0], world.host_a, {"10GE": 2})
        second = world.repo.claim(world.vms[1], world.host_a, {"10GE": 1})
        assert not {d.id for d in first} & {d.id for d in second}
        with pytest.raises(InsufficientDevices):
            world.repo.claim(world.vms[2], world.host_a, {"10GE": 1})

    def test_unknown_name_and_bad_count_are_refused(self, world: World) -> None:
        """A name the host lacks is insufficient; a negative count is invalid."""
        with pytest.raises(InsufficientDevices):
            world.repo.claim(world.vms[0], world.host_a, {"FPGA": 1})
        with pytest.raises(InvalidRequest):
            world.repo.claim(world.vms[0], world.host_a, {"10GE": -1})
        assert world.repo.claim(world.vms[0], world.host_a, {"10GE": 0}) == ()

    def test_release_is_idempotent_and_per_host(self, world: World) -> None:
        """Release frees a VM's devices on one host only, and a second release does nothing."""
        vm = world.vms[0]
        world.repo.claim(vm, world.host_a, {"10GE": 1})
        world.repo.claim(vm, world.host_b, {"GPU": 1})
        assert world.repo.release(vm, world.host_a) == 1
        assert world.repo.release(vm, world.host_a) == 0
        assert [d.host_id for d in world.repo.devices_of(vm)] == [world.host_b]
        assert world.repo.release(vm) == 1
        assert world.repo.devices_of(vm) == ()

    def test_migration_commit_moves_the_set(self, world: World) -> None:
        """Commit frees the source set and allocates the reserved destination set, once."""
        vm = world.vms[0]
        source = world.repo.claim(vm, world.host_a, {"10GE": 1, "GPU": 1})
        reserved = world.repo.reserve(vm, world.host_b, {"10GE": 1, "GPU": 1})
        assert {d.state for d in reserved} == {"reserved"}
        assert len(world.repo.devices_of(vm)) == 4  # both sets until the outcome
        assert world.repo.commit_migration(vm, world.host_a, world.host_b) == 2
        assert world.repo.commit_migration(vm, world.host_a, world.host_b) == 0
        held = world.repo.devices_of(vm)
        assert {d.id for d in held} == {d.id for d in reserved}
        assert {d.state for d in held} == {"allocated"}
        assert all(world.states(world.host_a)[d.address][0] == "free" for d in source)

    def test_migration_abort_keeps_the_source_set(self, world: World) -> None:
        """Abort frees the destination set and leaves the source set held, once."""
        vm = world.vms[0]
        source = world.repo.claim(vm, world.host_a, {"GPU": 2})
        world.repo.reserve(vm, world.host_b, {"GPU": 2})
        with pytest.raises(InsufficientDevices):
            world.repo.claim(world.vms[1], world.host_b, {"GPU": 1})
        assert world.repo.abort_migration(vm, world.host_b) == 2
        assert world.repo.abort_migration(vm, world.host_b) == 0
        assert world.repo.devices_of(vm) == source
        assert len(world.repo.claim(world.vms[1], world.host_b, {"GPU": 2})) == 2

    def test_commit_refuses_one_host_as_both_ends(self, world: World) -> None:
        """A migration whose source is its destination is an invalid request."""
        with pytest.raises(InvalidRequest):
            world.repo.commit_migration(world.vms[0], world.host_a, world.host_a)

    def test_reconcile_adds_renames_and_removes(self, world: World) -> None:
        """New devices are added, renamed ones renamed, vanished free ones removed."""
        changes = world.repo.reconcile(world.host_a, inventory(
            "28:00.0|10GE", "28:00.1|25GE", "41:00.0|GPU", "41:00.1|GPU", "0001:5e:00.0|NVME",
        ))
        assert changes.added == (PciAddress("0001:5e:00.0"),)
        assert changes.renamed == (PciAddress("28:00.1"),)
        assert changes.removed == (PciAddress("28:00.2"),)
        counts = {c.name: c for c in world.repo.counts(world.host_a)}
        assert (counts["10GE"].free, counts["10GE"].removed, counts["10GE"].total) == (1, 1, 1)
        assert (counts["25GE"].free, counts["NVME"].free) == (1, 1)
        again = world.repo.reconcile(world.host_a, STANDARD)
        assert PciAddress("28:00.2") in again.restored
        assert world.states(world.host_a)["0000:28:00.2"] == ("free", None)
        assert world.states(world.host_a)["0001:5e:00.0"] == ("removed", None)

    def test_reconcile_refuses_a_duplicate_address(self, world: World) -> None:
        """A report naming one address twice is rejected and changes nothing."""
        with pytest.raises(InvalidRequest, match="reported twice"):
            world.repo.reconcile(world.host_a, inventory("28:00.0|10GE", "0000:28:00.0|GPU"))

    def test_release_returns_each_device_with_its_host_guid(self, world: World) -> None:
        """A release returns what it let go of, as it was, and each event names its host."""
        vm = world.vms[0]
        held = (world.repo.claim(vm, world.host_a, {"10GE": 1})
                + world.repo.claim(vm, world.host_b, {"GPU": 1}))
        with world.engine.connect() as conn:
            guids = dict(conn.execute(select(Host.id, Host.guid)).all())
        released = UnitOfWork(world.engine).run(
            lambda tx: pci_devices.release_devices(tx.connection, vm))
        assert [(d.id, d.state, guid) for d, guid in released] == [
            (d.id, "allocated", guids[d.host_id]) for d in sorted(held, key=lambda d: d.id)]
        assert world.repo.devices_of(vm) == ()
        world.repo.claim(vm, world.host_a, {"10GE": 1})
        world.repo.claim(vm, world.host_b, {"GPU": 1})
        with world.engine.connect() as conn:  # the database outlives one test
            before = conn.execute(select(func.max(OutboxEvent.id))).scalar() or 0
        assert world.repo.release(vm) == 2
        with world.engine.connect() as conn:
            keys = conn.execute(select(OutboxEvent.routing_key).where(
                OutboxEvent.id > before, OutboxEvent.type == "PciDeviceReleased")).scalars().all()
        assert sorted(keys) == sorted(f"pci.{guids[h]}.Released"
                                      for h in (world.host_a, world.host_b))

    def test_vanished_held_device_is_quarantined_until_released(self, world: World) -> None:
        """A held device that vanishes is kept, never offered, and removed once released."""
        vm = world.vms[0]
        held = world.repo.claim(vm, world.host_a, {"GPU": 1})[0]
        rest = [d for d in STANDARD if d.address != held.address]
        assert world.repo.reconcile(world.host_a, rest).quarantined == (held.address,)
        assert world.states(world.host_a)[held.address] == ("quarantined", vm)
        with pytest.raises(InsufficientDevices):
            world.repo.claim(world.vms[1], world.host_a, {"GPU": 2})
        assert world.repo.release(vm, world.host_a) == 1
        assert world.states(world.host_a)[held.address] == ("removed", None)

    def test_quarantined_device_returns_to_its_vm(self, world: World) -> None:
        """A quarantined device reported again goes back to the VM that holds it."""
        vm = world.vms[0]
        held = world.repo.claim(vm, world.host_a, {"10GE": 1})[0]
        world.repo.reconcile(world.host_a, [d for d in STANDARD if d.address != held.address])
        changes = world.repo.reconcile(world.host_a, STANDARD)
        assert changes.restored == (held.address,)
        assert world.states(world.host_a)[held.address] == ("allocated", vm)

    def test_quarantined_reservation_follows_the_migration_outcome(self, world: World) -> None:
        """A reserved device that vanishes is removed on abort, kept quarantined on commit."""
        vm, other = world.vms[0], world.vms[1]
        reserved = world.repo.reserve(vm, world.host_b, {"GPU": 1})[0]
        world.repo.reserve(other, world.host_b, {"10GE": 1})
        gone = [d for d in STANDARD if d.name != "GPU" and d.address != "0000:28:00.2"]
        world.repo.reconcile(world.host_b, gone)
        assert world.states(world.host_b)[reserved.address] == ("quarantined", vm)
        world.repo.abort_migration(vm, world.host_b)
        assert world.states(world.host_b)[reserved.address] == ("removed", None)
        world.repo.commit_migration(other, world.host_a, world.host_b)
        assert {d.state for d in world.repo.devices_of(other)} == {"allocated"}

    def test_disable_and_enable(self, world: World) -> None:
        """Disable takes a free device out of offers, enable brings it back; both idempotent."""
        vm = world.vms[0]
        with world.engine.connect() as conn:
            ids = conn.exec_driver_sql(
                "SELECT id FROM op_host_pci_devices WHERE host_id = "
                f"{world.host_a} AND name = 'GPU' ORDER BY id"
            ).scalars().all()
            name, vm_uuid = conn.exec_driver_sql(
                f"SELECT name, uuid FROM vm_instances WHERE id = {vm}").one()
        assert world.repo.disable(ids[0]) == "disabled"
        assert world.repo.disable(ids[0]) == "disabled"
        with pytest.raises(InsufficientDevices):
            world.repo.claim(vm, world.host_a, {"GPU": 2})
        held = world.repo.claim(vm, world.host_a, {"GPU": 1})
        with pytest.raises(DeviceBusy, match=f"allocated by VM {name} \\({vm_uuid}\\)"):
            world.repo.disable(held[0].id)
        assert world.repo.enable(ids[0]) == "free"
        assert world.repo.enable(ids[0]) == "free"
        assert world.repo.enable(held[0].id) == "allocated"
        with pytest.raises(DeviceNotFound):
            world.repo.disable(10**9)

    def test_counts_add_up(self, world: World) -> None:
        """Per host and name, the counts by state add up to the devices in the inventory."""
        world.repo.claim(world.vms[0], world.host_a, {"10GE": 1})
        world.repo.reserve(world.vms[1], world.host_a, {"10GE": 1})
        with world.engine.connect() as conn:
            gpu = conn.exec_driver_sql(
                f"SELECT MIN(id) FROM op_host_pci_devices WHERE host_id = {world.host_a} "
                "AND name = 'GPU'"
            ).scalar_one()
        world.repo.disable(gpu)
        counts = {c.name: c for c in world.repo.counts(world.host_a)}
        assert (counts["10GE"].free, counts["10GE"].allocated, counts["10GE"].reserved) == (1, 1, 1)
        assert (counts["GPU"].free, counts["GPU"].disabled, counts["GPU"].total) == (1, 1, 2)
        everywhere = world.repo.counts()
        assert {c.host_id for c in everywhere} >= {world.host_a, world.host_b}

    def test_claim_joins_the_callers_transaction(self, world: World) -> None:
        """A claim made in a caller's transaction disappears when that transaction rolls back."""
        vm = world.vms[0]

        class Abandon(Exception):
            pass

        with pytest.raises(Abandon), transaction(world.engine) as conn:
            assert len(claim_devices(conn, vm, world.host_a, {"10GE": 3})) == 3
            assert len(devices_of_vm(conn, vm)) == 3
            raise Abandon
        assert world.repo.devices_of(vm) == ()
        with transaction(world.engine, read_only=True) as conn:
            free = {c.name: c.free for c in device_counts(conn, world.host_a)}
        assert free == {"10GE": 3, "GPU": 2}
