"""The hardware rules every database back end must keep: IOMMU groups, PF/VF, withheld devices.

One suite, run twice: ``tests/unit/mgmt/devices/test_device_rules.py`` on SQLite
and ``tests/integration/db/test_device_rules.py`` on MariaDB, through the
daemon's claim path (``ClaimPath``). The subclass's conftest provides
``engine``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import PciDeviceInfo, PciRequest
from hostdev.mgmt.devices import host_rules
from hostdev.mgmt.devices.availability import RuleChanges
from hostdev.mgmt.devices.pci_devices import InsufficientDevices
from hostdev.mgmt.devices.pci_inventory import reconcile_inventory
from hostdev.mgmt.persistence.database import transaction
from hostdev.mgmt.persistence.models import Host, PciDevice, VmInstance
from hostdev.mgmt.placement import planner
from hostdev.mgmt.placement.planner import Demand
from tests.support.databases import add_host, add_offering, add_vms
from tests.support.pci_device_contract import ClaimPath

PARTIAL = "IOMMU group 70 has 0000:7a:00.1, which is not in pci.devices"


def device(address: str, name: str, group: int | None, *, pf: str | None = None,
           withheld: str = "") -> PciDeviceInfo:
    """Returns a reported device with its IOMMU group, PF and what its agent withholds."""
    return PciDeviceInfo(address=PciAddress(address), name=name, iommu_group=group,
                         physical_function=PciAddress(pf) if pf else None, withheld=withheld)


#: A dual-function NIC in one group, a GPU with its audio function, a PF with two VFs,
#: an FPGA its agent withholds (partial group) and a NIC alone in its group.
RULED = [
    device("28:00.0", "10GE", 40), device("28:00.1", "10GE", 40),
    device("3b:00.0", "GPU", 41), device("3b:00.1", "GPU-AUDIO", 41),
    device("5e:00.0", "PF", 60), device("5e:02.0", "VF", 61, pf="5e:00.0"),
    device("5e:02.1", "VF", 62, pf="5e:00.0"),
    device("7a:00.0", "FPGA", 70, withheld=PARTIAL),
    device("81:00.0", "10GE", 81),
]


@dataclass
class RuledWorld:
    """One host with the RULED inventory, one without relations, and three VMs."""

    repo: ClaimPath
    engine: Engine
    host: int
    plain: int
    vms: list[int]

    def rows(self, host: int | None = None) -> dict[str, tuple[str, str, int | None]]:
        """Maps each address on a host to (state, reason, holding VM)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(PciDevice.__table__).where(
                PciDevice.host_id == (host or self.host))).all()
        return {f"{r.domain}:{r.bus}:{r.slot}.{r.function}":
                (r.state, r.reason, r.instance_id or r.reserved_for) for r in rows}

    def state(self, address: str) -> str:
        """Returns one device's state on the ruled host."""
        return self.rows()[str(PciAddress(address))][0]

    def reason(self, address: str) -> str:
        """Returns why one device of the ruled host is in its state."""
        return self.rows()[str(PciAddress(address))][1]

    def device_id(self, address: str) -> int:
        """Returns the id of a device of the ruled host."""
        a = PciAddress(address)
        with self.engine.connect() as conn:
            return int(conn.execute(select(PciDevice.id).where(
                PciDevice.host_id == self.host, PciDevice.bus == f"{a.bus:02x}",
                PciDevice.slot == f"{a.slot:02x}", PciDevice.function == f"{a.function:x}")
            ).scalar_one())

    def vm_name(self, vm: int) -> str:
        """Returns a VM's name, as reasons quote it."""
        with self.engine.connect() as conn:
            return str(conn.execute(select(VmInstance.name).where(VmInstance.id == vm))
                       .scalar_one())

    def host_row(self, host: int) -> tuple[int, bool]:
        """Returns (device_epoch, device_rules) of a host."""
        with self.engine.connect() as conn:
            epoch, rules = conn.execute(select(Host.device_epoch, Host.device_rules)
                                        .where(Host.id == host)).one()
        return int(epoch), bool(rules)


class DeviceRulesContract:
    """Each hardware rule through claims, releases, migrations, admin and inventory changes."""

    @pytest.fixture
    def world(self, engine: Engine) -> Iterator[RuledWorld]:
        """Creates the ruled host, a plain host and three VMs."""
        repo = ClaimPath(engine)
        with transaction(engine) as conn:
            host, plain = add_host(conn), add_host(conn)
            vms = add_vms(conn, add_offering(conn), 3)
        repo.reconcile(host, RULED)
        repo.reconcile(plain, [device("28:00.0", "10GE", 1), device("28:00.1", "10GE", 2)])
        yield RuledWorld(repo, engine, host, plain, vms)

    def test_withheld_devices_start_unavailable_with_the_agents_reason(
            self, world: RuledWorld) -> None:
        """A device its agent withholds is unavailable from its first report, never claimed."""
        assert (world.state("7a:00.0"), world.reason("7a:00.0")) == ("unavailable", PARTIAL)
        assert {s for a, (s, _, _) in world.rows().items() if a != "0000:7a:00.0"} == {"free"}
        with pytest.raises(InsufficientDevices):
            world.repo.claim(world.vms[0], world.host, {"FPGA": 1})

    def test_a_first_inventory_is_inserted_as_the_rules_make_it(
            self, world: RuledWorld) -> None:
        """A new host's one-INSERT inventory equals one reconciled row by row, then ruled."""
        with transaction(world.engine) as conn:
            fresh, stepwise = add_host(conn), add_host(conn)
            changes = reconcile_inventory(conn, fresh, RULED, new_host=True)
        assert sorted(changes.added) == sorted(PciAddress(d.address) for d in RULED)
        world.repo.reconcile(stepwise, RULED[-1:])  # a known row: the next report is merged
        world.repo.reconcile(stepwise, RULED)
        assert world.rows(fresh) == world.rows(stepwise)
        assert world.host_row(fresh)[1] is world.host_row(stepwise)[1] is True
        with transaction(world.engine) as conn:
            assert host_rules.apply_rules(conn, fresh) == RuleChanges()

    def test_a_claim_takes_the_whole_iommu_group(self, world: RuledWorld) -> None:
        """1x10GE gives a VM both functions of the dual-function NIC; the next, the lone NIC."""
        held = world.repo.claim(world.vms[0], world.host, {"10GE": 1})
        assert sorted(str(d.address) for d in held) == ["0000:28:00.0", "0000:28:00.1"]
        other = world.repo.claim(world.vms[1], world.host, {"10GE": 1})
        assert [str(d.address) for d in other] == ["0000:81:00.0"]
        with pytest.raises(InsufficientDevices):
            world.repo.claim(world.vms[2], world.host, {"10GE": 1})
        assert world.repo.release(world.vms[0]) == 2
        assert {world.state("28:00.0"), world.state("28:00.1")} == {"free"}

    def test_gpu_and_its_audio_function_go_together(self, world: RuledWorld) -> None:
        """A GPU claim brings its audio function, which then counts as held by the VM."""
        held = world.repo.claim(world.vms[0], world.host, {"GPU": 1})
        assert sorted(d.name for d in held) == ["GPU", "GPU-AUDIO"]
        counts = {c.name: c for c in world.repo.counts(world.host)}
        assert (counts["GPU-AUDIO"].allocated, counts["GPU-AUDIO"].free) == (1, 0)

    def test_a_disabled_member_keeps_its_group_from_offer(self, world: RuledWorld) -> None:
        """Disabling one NIC function makes the other unavailable, named; enabling frees both."""
        world.repo.disable(world.device_id("28:00.1"))
        assert world.state("28:00.0") == "unavailable"
        assert world.reason("28:00.0") == "IOMMU group 40: 0000:28:00.1 is disabled"
        held = world.repo.claim(world.vms[0], world.host, {"10GE": 1})
        assert [str(d.address) for d in held] == ["0000:81:00.0"]
        assert world.repo.enable(world.device_id("28:00.1")) == "free"
        assert world.state("28:00.0") == "free" and world.reason("28:00.0") == ""

    def test_an_unavailable_device_can_be_disabled_and_stays_kept_when_enabled(
            self, world: RuledWorld) -> None:
        """Disable takes an unavailable device too; enable gives it back to the rule keeping it."""
        fpga = world.device_id("7a:00.0")
        assert world.repo.disable(fpga) == "disabled"
        assert world.repo.enable(fpga) == "unavailable"
        assert world.reason("7a:00.0") == PARTIAL

    def test_a_held_vf_keeps_its_pf_and_a_held_pf_its_vfs(self, world: RuledWorld) -> None:
        """PF and VF are never held at once, in either order; releases give them back."""
        vf = world.repo.claim(world.vms[0], world.host, {"VF": 1})
        name = world.vm_name(world.vms[0])
        assert world.state("5e:00.0") == "unavailable"
        assert world.reason("5e:00.0") == f"its VF {vf[0].address} is held by VM {name}"
        with pytest.raises(InsufficientDevices):
            world.repo.claim(world.vms[1], world.host, {"PF": 1})
        world.repo.release(world.vms[0])
        assert world.state("5e:00.0") == "free"
        world.repo.claim(world.vms[1], world.host, {"PF": 1})
        assert {world.state("5e:02.0"), world.state("5e:02.1")} == {"unavailable"}
        assert world.reason("5e:02.1").startswith("its PF 0000:5e:00.0 is held by VM")
        with pytest.raises(InsufficientDevices):
            world.repo.claim(world.vms[0], world.host, {"VF": 1})

    def test_one_request_never_gets_a_pf_with_its_vf(self, world: RuledWorld) -> None:
        """Asked for the PF and one of its VFs at once, the claim is refused and changes nothing."""
        with pytest.raises(InsufficientDevices):
            world.repo.claim(world.vms[0], world.host, {"PF": 1, "VF": 1})
        assert world.repo.devices_of(world.vms[0]) == ()

    def test_a_migration_reserves_whole_groups_and_its_outcome_applies_the_rules(
            self, world: RuledWorld) -> None:
        """Reserve takes a group; abort frees it; commit frees the source and keeps the rules."""
        vm = world.vms[0]
        world.repo.claim(vm, world.plain, {"10GE": 1})
        reserved = world.repo.reserve(vm, world.host, {"VF": 1})
        assert world.state("5e:00.0") == "unavailable"
        assert world.reason("5e:00.0").endswith(f"is reserved for VM {world.vm_name(vm)}")
        world.repo.abort_migration(vm, world.host)
        assert world.state("5e:00.0") == "free"
        reserved = world.repo.reserve(vm, world.host, {"VF": 1})
        world.repo.commit_migration(vm, world.plain, world.host)
        assert {d.id for d in world.repo.devices_of(vm)} == {d.id for d in reserved}
        assert world.reason("5e:00.0").endswith(f"is held by VM {world.vm_name(vm)}")

    def test_a_member_reported_later_joins_its_held_group_as_unavailable(
            self, world: RuledWorld) -> None:
        """A new device in a group another VM holds is never offered."""
        world.repo.claim(world.vms[0], world.host, {"GPU": 1})
        world.repo.reconcile(world.host, [*RULED, device("3b:00.2", "GPU-USB", 41)])
        assert world.state("3b:00.2") == "unavailable"
        assert world.reason("3b:00.2").startswith("IOMMU group 41: 0000:3b:00.0 is held by VM")
        world.repo.reconcile(world.host, [*RULED[:7], device("7a:00.0", "FPGA", 70)])
        assert world.state("7a:00.0") == "free"  # no longer withheld

    def test_counts_add_up_with_unavailable_devices(self, world: RuledWorld) -> None:
        """free + unavailable + allocated + ... = total, per name, after rules took effect."""
        world.repo.claim(world.vms[0], world.host, {"VF": 2})
        counts = {c.name: c for c in world.repo.counts(world.host)}
        assert (counts["PF"].unavailable, counts["VF"].allocated, counts["FPGA"].unavailable) \
            == (1, 2, 1)
        for count in counts.values():
            assert count.free + count.unavailable + count.allocated == count.total

    def test_explain_and_refusal_say_which_rule_keeps_devices(self, world: RuledWorld) -> None:
        """A rejected host's verdict names the rule keeping its devices, and the VM holding."""
        world.repo.claim(world.vms[0], world.host, {"PF": 1})
        demand = Demand(cpus=1, memory_mb=1, pci=(PciRequest(name="VF", count=1),))
        with Session(world.engine) as session:
            (host,) = [h for h in planner.read_capacities(session, ["VF"]) if h.id == world.host]
            (verdict,) = [v for v in planner.explain(session, demand) if v.host_guid == host.guid]
        why = f"its PF 0000:5e:00.0 is held by VM {world.vm_name(world.vms[0])}"
        assert verdict.reason == f"needs 1xVF, 0 free (2 unavailable: {why})"
        assert planner.refusal(demand, [host]) == (
            f"no host has 1 x VF free: {host.name} has 0 (2 unavailable: {why})")

    def test_only_hosts_with_related_devices_serialize(self, world: RuledWorld) -> None:
        """A claim bumps device_epoch on a host with rules and leaves a plain host's row alone."""
        before, rules = world.host_row(world.host)
        plain_before, plain_rules = world.host_row(world.plain)
        assert (rules, plain_rules) == (True, False)
        world.repo.claim(world.vms[0], world.host, {"GPU": 1})
        world.repo.claim(world.vms[1], world.plain, {"10GE": 1})
        assert world.host_row(world.host)[0] > before
        assert world.host_row(world.plain)[0] == plain_before
