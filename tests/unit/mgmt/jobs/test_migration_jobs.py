"""Migration jobs with scripted agents: redelivery, lost answers, reports that settle them."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from hostdev.messages import api
from hostdev.messages.commands import (
    AttachPciDevicesAnswer,
    AttachPciDevicesCommand,
    ErrorAnswer,
    MigrateAnswer,
    MigrateCommand,
    PingRoutingCommand,
    StartupRoutingCommand,
)
from hostdev.messages.values import DeviceOutcome, DomainInfo
from hostdev.mgmt.persistence.models import Job, PciDevice, VmInstance, utcnow
from tests.support.mgmt_harness import Harness, Published, devices


def _startup(h: Harness, guid: str, domains: tuple[DomainInfo, ...] = ()) -> None:
    h.from_agent(guid, StartupRoutingCommand(guid=guid, name=guid, cpus=32, memory_mb=65536,
                                             pci_devices=devices(2),
                                             migration_uri=f"qemu+tcp://{guid}/system",
                                             domains=domains))


@pytest.fixture
def h(engine: Engine) -> Harness:
    """g1 and g2 with 2 x 10GE each; vm1 (10GE x 2, detach-attach) running on g1."""
    harness = Harness(engine)
    _startup(harness, "g1")
    _startup(harness, "g2")
    harness.api(api.CreateOfferingRequest(name="net2", pci_devices="10GE,10GE",
                                          migration_policy="detach-attach"))
    harness.api(api.DeployVmRequest(name="vm1", offering="net2"))
    harness.answer()
    return harness


def _vm(engine: Engine) -> tuple[str, str, int | None]:
    with Session(engine) as session:
        vm = session.scalars(select(VmInstance)).one()
        return vm.uuid, vm.state, vm.host_id


def _device_states(engine: Engine) -> list[tuple[int, str]]:
    with Session(engine) as session:
        return [(d.host_id, d.state) for d in session.scalars(
            select(PciDevice).order_by(PciDevice.id))]


def _job(h: Harness, job_id: int) -> api.JobRow:
    answer = h.api(api.GetJobRequest(job_id=job_id))
    assert isinstance(answer, api.JobList)
    return answer.jobs[0]


def _begin(h: Harness) -> tuple[int, Published]:
    accepted = h.api(api.MigrateVmRequest(vm="vm1", destination="g2"))
    assert isinstance(accepted, api.JobAccepted), accepted
    (command,) = h.commands(MigrateCommand)
    h.answered.add(command.message_id)
    return accepted.job_id, command


def _overdue(h: Harness, engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        session.execute(update(Job).where(Job.state == "running")
                        .values(deadline=utcnow() - timedelta(seconds=1)))
    h.service.expire_jobs()


def test_begin_reserves_while_the_source_set_stays(h: Harness, engine: Engine) -> None:
    """Migrating: g1's devices allocated, g2's reserved, the command names g2's URI."""
    _, command = _begin(h)
    assert isinstance(command.message, MigrateCommand)
    assert command.message.destination_uri == "qemu+tcp://g2/system"
    assert _vm(engine)[1] == "Migrating"
    assert _device_states(engine) == [(1, "allocated")] * 2 + [(2, "reserved")] * 2


def test_a_redelivered_answer_changes_nothing(h: Harness, engine: Engine) -> None:
    """The same MigrateAnswer twice commits once and sends one attach."""
    job_id, command = _begin(h)
    uuid = _vm(engine)[0]
    for message_id in ("answer-1", "answer-1", "answer-2"):
        h.from_agent("g1", MigrateAnswer(vm_uuid=uuid), correlation_id=command.message_id,
                     message_id=message_id)
    (attach,) = h.commands(AttachPciDevicesCommand)
    assert attach.routing_key == "agent.g2.AttachPciDevicesCommand"
    assert _device_states(engine) == [(1, "free")] * 2 + [(2, "allocated")] * 2
    assert isinstance(attach.message, AttachPciDevicesCommand)
    h.from_agent("g2", AttachPciDevicesAnswer(vm_uuid=uuid, devices=tuple(
        DeviceOutcome(address=a, result="ok") for a in attach.message.addresses)),
        correlation_id=attach.message_id)
    assert _job(h, job_id).state == "succeeded"
    assert _vm(engine)[1:] == ("Running", 2)


def test_lost_answer_waits_then_source_report_rolls_back(h: Harness, engine: Engine) -> None:
    """No answer: the job verifies, holding both sets; g1 restarted with the VM: rolled back."""
    job_id, _ = _begin(h)
    uuid = _vm(engine)[0]
    _overdue(h, engine)
    row = _job(h, job_id)
    assert (row.state, row.step) == ("running", "verify")
    assert _device_states(engine) == [(1, "allocated")] * 2 + [(2, "reserved")] * 2
    held = tuple(a for a in devices(2))
    _startup(h, "g1", (DomainInfo(uuid=uuid, name="vm1", state="running",
                                  hostdevs=tuple(d.address for d in held)),))
    row = _job(h, job_id)
    assert (row.state, row.step) == ("failed", "migrate"), row.details
    assert _vm(engine)[1:] == ("Running", 1)
    assert _device_states(engine) == [(1, "allocated")] * 2 + [(2, "free")] * 2


def test_lost_answer_then_destination_reports_the_vm(h: Harness, engine: Engine) -> None:
    """No answer, then g2 pings with the VM running: committed and attached on g2."""
    job_id, _ = _begin(h)
    uuid = _vm(engine)[0]
    _overdue(h, engine)
    h.from_agent("g2", PingRoutingCommand(guid="g2", domains=(
        DomainInfo(uuid=uuid, name="vm1", state="running"),)))
    assert _job(h, job_id).step == "attach"
    assert _device_states(engine) == [(1, "free")] * 2 + [(2, "allocated")] * 2
    assert len(h.commands(AttachPciDevicesCommand)) == 1


def test_vm_on_neither_host_becomes_error(h: Harness, engine: Engine) -> None:
    """Both hosts report no such domain after a lost answer: VM Error, devices released."""
    job_id, _ = _begin(h)
    _overdue(h, engine)
    _startup(h, "g1")
    h.from_agent("g2", PingRoutingCommand(guid="g2"))
    row = _job(h, job_id)
    assert (row.state, row.step) == ("failed", "verify"), row.details
    assert _vm(engine)[1] == "Error"
    assert {state for _, state in _device_states(engine)} == {"free"}


def test_attach_timeout_leaves_vm_running_with_devices_held(h: Harness, engine: Engine) -> None:
    """No attach answer: VM Running on g2, job failed at attach, g2's devices still held."""
    job_id, command = _begin(h)
    h.from_agent("g1", MigrateAnswer(vm_uuid=_vm(engine)[0]), correlation_id=command.message_id)
    _overdue(h, engine)
    row = _job(h, job_id)
    assert (row.state, row.step) == ("failed", "attach")
    assert "attach-devices vm1" in row.details
    assert _vm(engine)[1:] == ("Running", 2)
    assert _device_states(engine) == [(1, "free")] * 2 + [(2, "allocated")] * 2


def test_a_migration_no_destination_takes_says_why_for_each(h: Harness, engine: Engine) -> None:
    """g2 full, g3 without a migration URI: refused at once, naming g3 and its reason."""
    h.from_agent("g3", StartupRoutingCommand(guid="g3", name="g3", cpus=32, memory_mb=65536,
                                             pci_devices=devices(2)))
    assert isinstance(h.api(api.DeployVmRequest(name="vm2", offering="net2")), api.JobAccepted)
    h.answer()

    refused = h.api(api.MigrateVmRequest(vm="vm1"))

    assert isinstance(refused, ErrorAnswer) and refused.code == "no_capacity", refused
    assert refused.details == ("cannot migrate VM vm1: no destination takes it: "
                               "g3 announced no migration URI")
    with Session(engine) as session:
        assert session.scalar(select(VmInstance.state).where(VmInstance.name == "vm1")) \
            == "Running"
