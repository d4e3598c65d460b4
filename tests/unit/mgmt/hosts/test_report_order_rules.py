"""The ordering rules on scripted reports: per host, per VM, per boot, and old agents."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from hostdev.messages import api
from hostdev.messages.commands import (
    PingRoutingCommand,
    StartAnswer,
    StartCommand,
    StartupRoutingCommand,
    VmStateReport,
)
from hostdev.messages.values import DomainInfo
from hostdev.mgmt.hosts.report_order import STALE_REPORTS
from hostdev.mgmt.persistence.models import VmInstance
from tests.support.mgmt_harness import Harness, devices

BOOT = "b0"


@pytest.fixture
def h(engine: Engine) -> Harness:
    """Host g1 (boot b0, report 1) with 2 x 10GE and an offering that takes both."""
    harness = Harness(engine)
    harness.from_agent("g1", StartupRoutingCommand(guid="g1", name="g1", cpus=8, memory_mb=8192,
                                                   pci_devices=devices(2), boot_id=BOOT, seq=1))
    assert isinstance(harness.api(api.CreateOfferingRequest(
        name="net2", pci_devices="10GE,10GE")), api.OfferingList)
    return harness


def _started(h: Harness, seq: int) -> DomainInfo:
    """Deploys vm1 and answers its StartCommand as report ``seq`` of boot b0."""
    accepted = h.api(api.DeployVmRequest(name="vm1", offering="net2"))
    assert isinstance(accepted, api.JobAccepted)
    [command] = h.commands(StartCommand)
    assert isinstance(command.message, StartCommand)
    spec = command.message.vm
    h.answered.add(command.message_id)
    h.from_agent("g1", StartAnswer(vm_uuid=spec.uuid, hostdevs=spec.pci_devices,
                                   boot_id=BOOT, seq=seq), correlation_id=command.message_id)
    return DomainInfo(uuid=spec.uuid, name=spec.name, state="running", hostdevs=spec.pci_devices)


def _state(engine: Engine) -> tuple[str, str | None, int | None]:
    with Session(engine) as session:
        vm = session.scalar(select(VmInstance).where(VmInstance.name == "vm1"))
        assert vm is not None
        return vm.state, vm.answer_boot_id, vm.answer_seq


def test_a_report_older_than_the_vms_answer_leaves_the_vm_alone(h: Harness,
                                                               engine: Engine) -> None:
    """Report 3 predates answer 5: the VM stays Running; report 6 without it stops it."""
    _started(h, seq=5)
    assert _state(engine) == ("Running", BOOT, 5)
    before = STALE_REPORTS.labels("PingRoutingCommand", "vm")._value.get()
    h.from_agent("g1", PingRoutingCommand(guid="g1", boot_id=BOOT, seq=3))
    assert _state(engine)[0] == "Running"
    assert STALE_REPORTS.labels("PingRoutingCommand", "vm")._value.get() == before + 1
    h.from_agent("g1", PingRoutingCommand(guid="g1", boot_id=BOOT, seq=6))
    assert _state(engine)[0] == "Stopped"


def test_a_report_not_newer_than_the_last_applied_is_not_applied(h: Harness,
                                                                 engine: Engine) -> None:
    """A lifecycle report numbered below the last applied ping changes nothing."""
    domain = _started(h, seq=2)
    h.from_agent("g1", PingRoutingCommand(guid="g1", boot_id=BOOT, seq=4, domains=(domain,)))
    h.from_agent("g1", VmStateReport(guid="g1", vm_uuid=domain.uuid, state="stopped",
                                     boot_id=BOOT, seq=3))
    h.from_agent("g1", PingRoutingCommand(guid="g1", boot_id=BOOT, seq=4))  # a redelivery
    assert _state(engine)[0] == "Running"
    h.from_agent("g1", VmStateReport(guid="g1", vm_uuid=domain.uuid, state="stopped",
                                     boot_id=BOOT, seq=5))
    assert _state(engine)[0] == "Stopped"


def test_a_start_up_of_a_new_boot_resets_the_sequence(h: Harness, engine: Engine) -> None:
    """After a restart the agent counts from 1: its start-up and pings apply."""
    domain = _started(h, seq=40)
    h.from_agent("g1", StartupRoutingCommand(guid="g1", name="g1", cpus=8, memory_mb=8192,
                                             pci_devices=devices(2), domains=(domain,),
                                             boot_id="b1", seq=1))
    assert _state(engine)[0] == "Running"
    h.from_agent("g1", PingRoutingCommand(guid="g1", boot_id="b1", seq=2))
    assert _state(engine)[0] == "Stopped"


def test_reports_of_old_agents_keep_the_time_grace(h: Harness, engine: Engine) -> None:
    """Without a boot id a report is applied, except to a VM changed in the last 5 s."""
    _started(h, seq=5)
    h.from_agent("g1", PingRoutingCommand(guid="g1"))
    assert _state(engine)[0] == "Running"
