"""Claims under a NUMA policy, the same on every database back end.

Run twice: ``tests/unit/mgmt/devices/test_numa_claims.py`` on SQLite and
``tests/integration/db/test_numa_claims.py`` on MariaDB; each provides an
``engine`` fixture (a migrated database).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, select

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import NumaPolicy, PciDeviceInfo
from hostdev.mgmt.devices import numa
from hostdev.mgmt.devices.pci_devices import HeldDevice, InsufficientDevices
from hostdev.mgmt.persistence.database import transaction
from hostdev.mgmt.persistence.models import PciDevice
from hostdev.mgmt.persistence.unit_of_work import TxContext, UnitOfWork
from tests.support.databases import add_host, add_offering, add_vms
from tests.support.pci_device_contract import ClaimPath

#: GPUs: one on node 0, two on node 1; 10GE: one on each node.
NUMA_INVENTORY = (
    ("3b:00.0", "GPU", 0), ("3b:00.1", "GPU", 1), ("3b:00.2", "GPU", 1),
    ("28:00.0", "10GE", 0), ("28:00.1", "10GE", 1),
)


@dataclass
class NumaWorld:
    """A host with NUMA_INVENTORY, a host whose devices have no node, and three VMs."""

    engine: Engine
    numa_host: int
    flat_host: int
    vms: list[int]

    def take(self, vm: int, host: int, requests: Mapping[str, int], policy: NumaPolicy, *,
             reserve: bool = False, prefer: int | None = None,
             ) -> tuple[tuple[HeldDevice, ...], int | None]:
        """Claims (or reserves) in one unit of work, as the daemon does."""
        def work(tx: TxContext) -> tuple[tuple[HeldDevice, ...], int | None]:
            return numa.take_on_node(tx.connection, vm, host, requests, policy,
                                     reserve=reserve, prefer=prefer)
        return UnitOfWork(self.engine).run(work, what="take on node")

    def nodes(self, held: tuple[HeldDevice, ...]) -> list[int | None]:
        """Returns the NUMA node of each device, in the order given."""
        with self.engine.connect() as conn:
            by_id = dict(conn.execute(select(PciDevice.id, PciDevice.numa_node).where(
                PciDevice.id.in_([d.id for d in held]))).all())
        return [by_id[d.id] for d in held]


class NumaClaimContract:
    """Which devices a claim takes under each NUMA policy, and which node it records."""

    @pytest.fixture
    def world(self, engine: Engine) -> NumaWorld:
        """Creates the two hosts and three VMs."""
        with transaction(engine) as conn:
            numa_host, flat_host = add_host(conn), add_host(conn)
            vms = add_vms(conn, add_offering(conn), 3)
        repo = ClaimPath(engine)
        repo.reconcile(numa_host, [PciDeviceInfo(address=PciAddress(a), name=n, numa_node=node)
                                   for a, n, node in NUMA_INVENTORY])
        repo.reconcile(flat_host, [PciDeviceInfo(address=PciAddress(a), name=n)
                                   for a, n, _ in NUMA_INVENTORY])
        return NumaWorld(engine, numa_host, flat_host, vms)

    def test_required_takes_every_device_on_the_first_node_with_room(
            self, world: NumaWorld) -> None:
        """Two GPUs fit only on node 1; a GPU and a 10GE fit on node 0, the first."""
        held, node = world.take(world.vms[0], world.numa_host, {"GPU": 2}, "required")
        assert (world.nodes(held), node) == ([1, 1], 1)
        held, node = world.take(world.vms[1], world.numa_host, {"GPU": 1, "10GE": 1},
                                "required")
        assert (world.nodes(held), node) == ([0, 0], 0)

    def test_required_refuses_a_host_without_one_node_that_fits(self, world: NumaWorld) -> None:
        """No node has 2 GPUs and 2 10GE: refused, nothing taken, each node's count named."""
        with pytest.raises(InsufficientDevices) as caught:
            world.take(world.vms[0], world.numa_host, {"GPU": 2, "10GE": 2}, "required")
        assert ("no NUMA node has 2x10GE and 2xGPU free (node 0 has 1x10GE 1xGPU, "
                "node 1 has 1x10GE 2xGPU)") in str(caught.value)
        assert (caught.value.name, caught.value.wanted, caught.value.free) == ("10GE", 2, 1)
        held, _ = world.take(world.vms[1], world.numa_host, {"GPU": 3, "10GE": 2}, "none")
        assert len(held) == 5  # nothing was left taken by the refused claim

    def test_preferred_uses_one_node_when_it_can_and_spreads_when_it_cannot(
            self, world: NumaWorld) -> None:
        """Preferred puts two GPUs on node 1; a GPU and two 10GE then fit only spread."""
        held, node = world.take(world.vms[0], world.numa_host, {"GPU": 2}, "preferred")
        assert (world.nodes(held), node) == ([1, 1], 1)
        held, node = world.take(world.vms[1], world.numa_host, {"GPU": 1, "10GE": 2},
                                "preferred")
        assert (sorted(world.nodes(held)), node) == ([0, 0, 1], None)

    def test_no_policy_takes_by_id_and_records_no_node(self, world: NumaWorld) -> None:
        """Policy none takes the first devices by id, across nodes, and records no node."""
        held, node = world.take(world.vms[0], world.numa_host, {"GPU": 2}, "none")
        assert (world.nodes(held), node) == ([0, 1], None)

    def test_a_host_without_numa_is_one_node_and_records_none(self, world: NumaWorld) -> None:
        """Devices without a node count as one node: required fits, and no node is recorded."""
        held, node = world.take(world.vms[0], world.flat_host, {"GPU": 3, "10GE": 2},
                                "required")
        assert (len(held), node) == (5, None)

    def test_a_reservation_prefers_the_node_the_vm_is_on(self, world: NumaWorld) -> None:
        """A migration's reservation keeps node 1 when it fits there, though node 0 comes first."""
        held, node = world.take(world.vms[0], world.numa_host, {"GPU": 1, "10GE": 1},
                                "required", reserve=True, prefer=1)
        assert (world.nodes(held), node, {d.state for d in held}) == ([1, 1], 1, {"reserved"})

    def test_required_goes_on_to_the_next_node_when_the_rules_refuse_one(
            self, world: NumaWorld) -> None:
        """Node 0 has two free GPUs by count, a PF and its own VF, which one VM may not hold
        together; node 1 has two plain ones: required takes node 1's. With node 1's taken,
        the refusal is the rules'."""
        with transaction(world.engine) as conn:
            ruled = add_host(conn)
        pf = PciAddress("5e:00.0")
        ClaimPath(world.engine).reconcile(ruled, [
            PciDeviceInfo(address=pf, name="GPU", numa_node=0),
            PciDeviceInfo(address=PciAddress("5e:00.1"), name="GPU", numa_node=0,
                          physical_function=pf),
            PciDeviceInfo(address=PciAddress("3b:00.0"), name="GPU", numa_node=1),
            PciDeviceInfo(address=PciAddress("3b:00.1"), name="GPU", numa_node=1)])
        held, node = world.take(world.vms[0], ruled, {"GPU": 2}, "required")
        assert (world.nodes(held), node) == ([1, 1], 1)
        with pytest.raises(InsufficientDevices, match="PF") as caught:
            world.take(world.vms[1], ruled, {"GPU": 2}, "required")
        assert caught.value.by_rules
