"""A VM management thinks Stopped that its host reports running gets its devices back."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from hostdev.messages import api
from hostdev.messages.commands import PingRoutingCommand
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DomainInfo
from hostdev.mgmt.persistence.models import Host, PciDevice, VmInstance, utcnow
from tests.support.mgmt_harness import Harness, devices

ADDRESSES = (PciAddress("28:00.0"), PciAddress("28:00.1"))


@pytest.fixture
def h(engine: Engine) -> Harness:
    """One host with 2 x 10GE and an offering that takes both."""
    harness = Harness(engine)
    harness.register("g1", "h1", devices(2))
    assert isinstance(harness.api(api.CreateOfferingRequest(
        name="net2", pci_devices="10GE,10GE")), api.OfferingList)
    return harness


def _run_then_stop(h: Harness, engine: Engine, name: str, offering: str = "net2") -> str:
    """Deploys ``name``, stops it, and ages its last transition past the drift grace."""
    accepted = h.api(api.DeployVmRequest(name=name, offering=offering))
    assert isinstance(accepted, api.JobAccepted)
    h.answer()
    assert isinstance(h.api(api.StopVmRequest(vm=name)), api.JobAccepted)
    h.answer()
    with Session(engine) as session, session.begin():
        session.execute(update(VmInstance).where(VmInstance.name == name)
                        .values(updated_at=utcnow() - timedelta(minutes=1)))
    assert accepted.vm_uuid is not None
    return accepted.vm_uuid


def _ping_running(h: Harness, uuid: str, name: str) -> None:
    h.from_agent("g1", PingRoutingCommand(guid="g1", domains=(DomainInfo(
        uuid=uuid, name=name, state="running", hostdevs=ADDRESSES),)))


def _holders(engine: Engine) -> dict[str, str | None]:
    with Session(engine) as session:
        rows = session.execute(select(PciDevice.bus, PciDevice.function, VmInstance.name)
                               .outerjoin(VmInstance, VmInstance.id == PciDevice.instance_id))
        return {f"{bus}.{function}": vm for bus, function, vm in rows}


def test_stopped_vm_reported_running_is_running_with_its_devices(h: Harness,
                                                                 engine: Engine) -> None:
    """The VM becomes Running on the reporting host and holds the devices its domain has."""
    uuid = _run_then_stop(h, engine, "vm1")
    assert set(_holders(engine).values()) == {None}
    _ping_running(h, uuid, "vm1")
    with Session(engine) as session:
        vm = session.scalar(select(VmInstance).where(VmInstance.uuid == uuid))
        host = session.scalar(select(Host).where(Host.guid == "g1"))
        assert vm is not None and host is not None
        assert (vm.state, vm.host_id, vm.numa_node) == ("Running", host.id, None)
    assert _holders(engine) == {"28.0": "vm1", "28.1": "vm1"}
    assert h.events("pci.g1.Allocated")[-2:] == ["pci.g1.Allocated"] * 2
    assert h.events(f"vm.{uuid}")[-1] == f"vm.{uuid}.Running"


def test_devices_held_by_another_vm_are_not_taken(h: Harness, engine: Engine) -> None:
    """When another VM holds the devices, nothing changes: the conflict is the operator's."""
    uuid = _run_then_stop(h, engine, "vm1")
    assert isinstance(h.api(api.DeployVmRequest(name="vm2", offering="net2")), api.JobAccepted)
    h.answer()
    _ping_running(h, uuid, "vm1")
    with Session(engine) as session:
        vm = session.scalar(select(VmInstance).where(VmInstance.uuid == uuid))
        assert vm is not None and vm.state == "Stopped"
    assert _holders(engine) == {"28.0": "vm2", "28.1": "vm2"}


def test_a_report_within_the_grace_does_not_undo_a_fresh_stop(h: Harness,
                                                              engine: Engine) -> None:
    """A ping taken before a stop was answered does not bring the VM back."""
    accepted = h.api(api.DeployVmRequest(name="vm1", offering="net2"))
    assert isinstance(accepted, api.JobAccepted) and accepted.vm_uuid
    h.answer()
    h.api(api.StopVmRequest(vm="vm1"))
    h.answer()
    _ping_running(h, accepted.vm_uuid, "vm1")
    with Session(engine) as session:
        vm = session.scalar(select(VmInstance).where(VmInstance.uuid == accepted.vm_uuid))
        assert vm is not None and vm.state == "Stopped"
    assert set(_holders(engine).values()) == {None}


def test_a_vm_found_running_records_the_numa_node_its_devices_share(engine: Engine) -> None:
    """Its devices on one node: that node is the VM's, as a claim would have recorded it.

    Under policy ``none`` no node is recorded, as a claim records none.
    """
    h = Harness(engine)
    h.register("g1", "h1", tuple(msgspec.structs.replace(d, numa_node=1) for d in devices(2)))
    for name, policy in (("net2", "preferred"), ("any2", "none")):
        assert isinstance(h.api(api.CreateOfferingRequest(
            name=name, pci_devices="10GE,10GE", numa_policy=policy)), api.OfferingList)
    nodes = {}
    for vm_name, offering in (("vm1", "net2"), ("vm2", "any2")):
        uuid = _run_then_stop(h, engine, vm_name, offering)
        _ping_running(h, uuid, vm_name)
        with Session(engine) as session:
            vm = session.scalar(select(VmInstance).where(VmInstance.uuid == uuid))
            assert vm is not None and vm.state == "Running"
            nodes[vm_name] = vm.numa_node
        assert isinstance(h.api(api.StopVmRequest(vm=vm_name)), api.JobAccepted)
        h.answer()
    assert nodes == {"vm1": 1, "vm2": None}
