"""ManagementService on SQLite with a recording bus and scripted agents."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from hostdev.messages import api
from hostdev.messages.commands import (
    ErrorAnswer,
    PingRoutingCommand,
    StartCommand,
    StartupAnswer,
    StartupRoutingCommand,
    StopCommand,
    VmStateReport,
)
from hostdev.messages.errors import InvalidFieldError
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.errors import Forbidden
from hostdev.mgmt.persistence.models import (
    HandledMessage,
    Host,
    Job,
    OutboxEvent,
    PciDevice,
    VmInstance,
    utcnow,
)
from tests.support.mgmt_harness import Harness, devices


@pytest.fixture
def h(engine: Engine) -> Harness:
    """A service with three hosts: h1 with 2 x 10GE, h2 with 3 x 10GE, h3 with 1 GPU."""
    harness = Harness(engine)
    harness.register("g1", "h1", devices(2))
    harness.register("g2", "h2", devices(3))
    harness.register("g3", "h3", devices(1, "GPU"))
    answer = harness.api(api.CreateOfferingRequest(name="net2", cpus=2, memory_mb=1024,
                                                   pci_devices="10GE,10GE"))
    assert isinstance(answer, api.OfferingList), answer
    return harness


def _deploy(h: Harness, name: str, offering: str = "net2") -> api.JobAccepted:
    answer = h.api(api.DeployVmRequest(name=name, offering=offering))
    assert isinstance(answer, api.JobAccepted), answer
    return answer


def _job(h: Harness, job_id: int) -> api.JobList:
    answer = h.api(api.GetJobRequest(job_id=job_id))
    assert isinstance(answer, api.JobList)
    return answer


def _holders(engine: Engine) -> dict[int, int]:
    with Session(engine) as session:
        return dict(session.execute(
            select(PciDevice.instance_id, func.count()).where(PciDevice.instance_id.is_not(None))
            .group_by(PciDevice.instance_id)).all())  # type: ignore[arg-type]


def test_startup_registers_host_and_answers(engine: Engine) -> None:
    """StartupRoutingCommand creates the host, stores its devices and answers StartupAnswer."""
    harness = Harness(engine, MgmtConfig(ping_interval_s=15))
    answer = harness.register("g1", "h1", devices(4))
    assert isinstance(answer, StartupAnswer) and answer.host_id > 0
    assert answer.ping_interval_s == 15
    hosts = harness.api(api.ListHostsRequest())
    assert isinstance(hosts, api.HostList)
    assert [(x.name, x.status, x.free_devices, x.total_devices) for x in hosts.hosts] == [
        ("h1", "Up", 4, 4)]
    assert harness.events("host.") == ["host.g1.Up"]


def test_offering_with_unknown_device_name_is_refused(h: Harness) -> None:
    """An offering naming a device no host has is refused, listing the names that exist."""
    answer = h.api(api.CreateOfferingRequest(name="x", pci_devices="40GE"))
    assert isinstance(answer, ErrorAnswer) and answer.code == "invalid"
    assert "named 40GE; names that exist: 10GE, GPU" in answer.details


def test_deploy_runs_until_devices_run_out_then_says_why(h: Harness, engine: Engine) -> None:
    """Deploys take 10GE pairs first fit; the next one is refused with a per-host reason."""
    first, second = _deploy(h, "vm1"), _deploy(h, "vm2")
    starts = h.commands(StartCommand)
    assert [p.routing_key for p in starts] == ["agent.g1.StartCommand", "agent.g2.StartCommand"]
    assert all(len(p.message.vm.pci_devices) == 2 for p in starts)  # type: ignore[attr-defined]
    answer = h.api(api.DeployVmRequest(name="vm3", offering="net2"))
    assert isinstance(answer, ErrorAnswer) and answer.code == "no_capacity"
    assert answer.details == "no host has 2 x 10GE free: h1 has 0, h2 has 1, h3 has 0"
    assert h.answer() == 2
    for accepted in (first, second):
        assert _job(h, accepted.job_id).jobs[0].state == "succeeded"
    vms = h.api(api.ListVmsRequest())
    assert isinstance(vms, api.VmList)
    assert [(v.name, v.state, v.host_name, len(v.pci_devices)) for v in vms.vms] == [
        ("vm1", "Running", "h1", 2), ("vm2", "Running", "h2", 2)]
    assert sorted(_holders(engine).values()) == [2, 2]
    assert h.events(f"vm.{first.vm_uuid}") == [f"vm.{first.vm_uuid}.Starting",
                                                f"vm.{first.vm_uuid}.Running"]
    assert h.events("pci.g1") == ["pci.g1.Allocated", "pci.g1.Allocated"]
    assert f"job.{first.job_id}.Succeeded" in h.events("job.")


def test_stop_frees_devices_for_the_next_deploy(h: Harness, engine: Engine) -> None:
    """Stopping a VM releases its devices and the next deploy gets them."""
    first = _deploy(h, "vm1")
    _deploy(h, "vm2")
    h.answer()
    stop = h.api(api.StopVmRequest(vm="vm1"))
    assert isinstance(stop, api.JobAccepted)
    assert [p.routing_key for p in h.commands(StopCommand)] == ["agent.g1.StopCommand"]
    h.answer()
    assert _job(h, stop.job_id).jobs[0].state == "succeeded"
    assert h.events("pci.g1.Released") == ["pci.g1.Released"] * 2
    third = _deploy(h, "vm3")
    assert [p.routing_key for p in h.commands(StartCommand)] == ["agent.g1.StartCommand"]
    h.answer()
    with Session(engine) as session:
        vm1 = session.scalar(select(VmInstance).where(VmInstance.uuid == first.vm_uuid))
        assert vm1 is not None and vm1.state == "Stopped" and vm1.host_id is None
    assert _job(h, third.job_id).jobs[0].state == "succeeded"


def test_failed_start_tries_the_next_host(h: Harness) -> None:
    """A host refusing StartCommand releases its devices and the job moves to the next host."""
    accepted = _deploy(h, "vm1")
    assert h.answer(ok=False, details="no IOMMU") == 1
    assert [p.routing_key for p in h.commands(StartCommand)] == ["agent.g2.StartCommand"]
    assert h.answer() == 1
    job = _job(h, accepted.job_id).jobs[0]
    assert job.state == "succeeded" and job.details == "running on h2"


def test_start_timeout_fails_job_and_rolls_back(h: Harness, engine: Engine) -> None:
    """A start without answer past its deadline fails, releases devices, stops the domain."""
    accepted = _deploy(h, "vm1")
    h.answered.update(p.message_id for p in h.commands())  # the agent never answers
    with Session(engine) as session, session.begin():
        session.execute(update(Job).values(deadline=utcnow() - timedelta(seconds=1)))
    h.service.expire_jobs()
    job = _job(h, accepted.job_id).jobs[0]
    assert job.state == "failed" and "timed out" in job.details
    assert _holders(engine) == {}
    assert [p.routing_key for p in h.commands(StopCommand)] == ["agent.g1.StopCommand"]
    vms = h.api(api.ListVmsRequest())
    assert isinstance(vms, api.VmList) and vms.vms[0].state == "Stopped"
    # A late answer to the rolled-back start changes nothing.
    h.answered.clear()
    h.answer()
    assert _holders(engine) == {}


def test_ping_without_the_domain_stops_vm_and_releases(h: Harness, engine: Engine) -> None:
    """A Running VM its host no longer reports becomes Stopped and frees its devices."""
    accepted = _deploy(h, "vm1")
    h.answer()
    with Session(engine) as session, session.begin():
        session.execute(update(VmInstance).values(updated_at=utcnow() - timedelta(minutes=1)))
    h.ping("g1")  # still running: nothing changes
    assert sum(_holders(engine).values()) == 2
    h.domains["g1"].clear()
    h.ping("g1")
    assert _holders(engine) == {}
    assert h.events(f"vm.{accepted.vm_uuid}.Stopped")


def test_silent_host_goes_disconnected_then_down_and_is_not_offered(
        h: Harness, engine: Engine) -> None:
    """The sweeper marks a silent host Disconnected then Down; placement skips it."""
    with Session(engine) as session, session.begin():
        session.execute(update(Host).where(Host.guid == "g1")
                        .values(last_ping=utcnow() - timedelta(seconds=100)))
    h.service.sweep_hosts()
    assert h.events("host.g1") == ["host.g1.Up", "host.g1.Disconnected"]
    with Session(engine) as session, session.begin():
        session.execute(update(Host).where(Host.guid == "g1")
                        .values(last_ping=utcnow() - timedelta(seconds=1000)))
    h.service.sweep_hosts()
    assert h.events("host.g1")[-1] == "host.g1.Down"
    explanation = h.api(api.ExplainPlacementRequest(offering="net2"))
    assert isinstance(explanation, api.PlacementExplanation)
    assert [(v.host_name, v.accepted, v.reason) for v in explanation.verdicts] == [
        ("h1", False, "is Down"), ("h2", True, "fits"),
        ("h3", False, "needs 2x10GE, 0 free")]
    free = h.api(api.ListPciDevicesRequest(free_only=True))
    assert isinstance(free, api.PciDeviceList)
    assert {d.host_name for d in free.devices} == {"h2", "h3"}  # h1 is Down
    _deploy(h, "vm1")
    assert [p.routing_key for p in h.commands(StartCommand)] == ["agent.g2.StartCommand"]
    h.ping("g1")
    assert h.events("host.g1")[-1] == "host.g1.Up"


def test_reregistration_keeps_allocations(h: Harness, engine: Engine) -> None:
    """A host that registers again with its VM running keeps the VM's devices."""
    _deploy(h, "vm1")
    h.answer()
    h.register("g1", "h1", devices(2))
    assert sorted(_holders(engine).values()) == [2]
    vms = h.api(api.ListVmsRequest())
    assert isinstance(vms, api.VmList) and vms.vms[0].state == "Running"


def test_agent_speaking_for_another_host_is_refused(h: Harness) -> None:
    """A message from broker user agent-g2 that speaks for g1 is refused (dead-lettered)."""
    startup = StartupRoutingCommand(guid="g1", name="h1", cpus=4, memory_mb=4096,
                                    pci_devices=devices(2))
    with pytest.raises(Forbidden, match="agent-g2 may not speak for host g1"):
        h.from_agent("g1", startup, user_id="agent-g2")
    assert isinstance(h.from_agent("g1", startup, user_id="agent-g1"), StartupAnswer)
    with pytest.raises(Forbidden, match="carries no user_id"):
        h.from_agent("g1", startup, user_id=None)


def test_redelivered_messages_are_handled_once(h: Harness, engine: Engine) -> None:
    """A deploy delivered twice (same message_id) acts once and answers the same job."""
    first = h.api(api.DeployVmRequest(name="vm1", offering="net2"), message_id="dup-1")
    again = h.api(api.DeployVmRequest(name="vm1", offering="net2"), message_id="dup-1")
    assert isinstance(first, api.JobAccepted) and isinstance(again, api.JobAccepted)
    assert (again.job_id, again.vm_uuid) == (first.job_id, first.vm_uuid)
    offering = h.api(api.CreateOfferingRequest(name="o2", pci_devices="GPU"), message_id="d2")
    duplicate = h.api(api.CreateOfferingRequest(name="o2", pci_devices="GPU"), message_id="d2")
    assert isinstance(offering, api.OfferingList)
    assert isinstance(duplicate, ErrorAnswer) and duplicate.code == "duplicate"
    start = h.commands(StartCommand)[0]
    h.answer()
    h.answered.discard(start.message_id)
    h.answer()  # the same StartAnswer again: ignored
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(VmInstance)) == 1
        assert session.scalar(select(VmInstance.state)) == "Running"


def test_destroy_running_vm_stops_then_releases(h: Harness, engine: Engine) -> None:
    """Destroying a running VM force-stops and undefines it, then frees its devices."""
    _deploy(h, "vm1")
    h.answer()
    accepted = h.api(api.DestroyVmRequest(vm="vm1"))
    assert isinstance(accepted, api.JobAccepted)
    stop = h.commands(StopCommand)[0].message
    assert isinstance(stop, StopCommand) and stop.force and stop.undefine
    h.answer()
    assert _job(h, accepted.job_id).jobs[0].state == "succeeded"
    assert _holders(engine) == {}
    vms = h.api(api.ListVmsRequest())
    assert isinstance(vms, api.VmList) and vms.vms == ()


def test_errors_name_what_is_missing(h: Harness) -> None:
    """Unknown VM, offering and job give not_found with a hint."""
    answers = [h.api(api.StopVmRequest(vm="nope")),
               h.api(api.DeployVmRequest(name="a", offering="nope")),
               h.api(api.GetJobRequest(job_id=999))]
    assert all(isinstance(a, ErrorAnswer) and a.code == "not_found" for a in answers)
    assert "offerings: net2" in answers[1].details  # type: ignore[attr-defined]


def test_disable_device_takes_it_out_of_placement(h: Harness) -> None:
    """A disabled device is not offered; enabled again, it is."""
    answer = h.api(api.SetPciDeviceEnabledRequest(host="h1", address="28:00.0",  # type: ignore[arg-type]
                                                  enabled=False))
    assert isinstance(answer, api.DeviceStateChanged) and answer.device.state == "disabled"
    _deploy(h, "vm1")
    assert [p.routing_key for p in h.commands(StartCommand)] == ["agent.g2.StartCommand"]
    free = h.api(api.ListPciDevicesRequest(host="h1", free_only=True))
    assert isinstance(free, api.PciDeviceList) and len(free.devices) == 1


def test_purge_forgets_old_handled_ids_and_published_events(h: Harness, engine: Engine) -> None:
    """The hourly purge deletes handled message ids and outbox rows once published."""
    _deploy(h, "vm1")
    h.answer()
    h.service.purge(older_than_s=-1)
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(HandledMessage)) == 0
        assert session.scalar(select(func.count()).select_from(OutboxEvent)) == 0


def test_vm_state_report_stopped_releases_devices(h: Harness, engine: Engine) -> None:
    """A pushed VmStateReport saying a Running VM stopped makes it Stopped, devices free."""
    accepted = _deploy(h, "vm1")
    h.answer()
    with Session(engine) as session, session.begin():
        session.execute(update(VmInstance).values(updated_at=utcnow() - timedelta(minutes=1)))
    h.from_agent("g1", VmStateReport(guid="g1", vm_uuid=accepted.vm_uuid or "",
                                     state="stopped", event="Stopped/Destroyed"))
    assert _holders(engine) == {}
    assert h.events(f"vm.{accepted.vm_uuid}")[-1] == f"vm.{accepted.vm_uuid}.Stopped"


def test_routing_key_of_another_host_is_refused(h: Harness) -> None:
    """A ping published on mgmt.g2.* that speaks for g1 is refused."""
    handler = h.bus.consumers["hostdev.mgmt"][PingRoutingCommand]
    with pytest.raises(Forbidden, match="an agent may only speak for itself"):
        handler(PingRoutingCommand(guid="g1"), h.incoming("mgmt.g2.PingRoutingCommand"))


def test_stop_timeout_fails_job_and_keeps_vm_running(h: Harness, engine: Engine) -> None:
    """A stop without answer past its deadline fails; the VM is Running with its devices."""
    _deploy(h, "vm1")
    h.answer()
    stop = h.api(api.StopVmRequest(vm="vm1"))
    assert isinstance(stop, api.JobAccepted)
    with Session(engine) as session, session.begin():
        session.execute(update(Job).where(Job.id == stop.job_id)
                        .values(deadline=utcnow() - timedelta(seconds=1)))
    h.service.expire_jobs()
    job = _job(h, stop.job_id).jobs[0]
    assert job.state == "failed" and "considered Running" in job.details
    assert sum(_holders(engine).values()) == 2
    assert f"job.{stop.job_id}.Failed" in h.events("job.")


def test_command_left_unpublished_by_a_dead_daemon_is_sent_by_another(
        h: Harness, engine: Engine) -> None:
    """A daemon that committed a deploy but died before publishing: another one publishes it."""
    def broker_gone(*args: object, **kwargs: object) -> str:
        raise ConnectionError("broker connection lost")

    h.bus.publish = broker_gone  # type: ignore[method-assign]
    accepted = _deploy(h, "vm1")
    survivor = Harness(engine)
    with Session(engine) as session, session.begin():
        session.execute(update(OutboxEvent).values(created_at=utcnow() - timedelta(minutes=1)))
    survivor.service.outbox.publish_stale()
    assert [p.routing_key for p in survivor.commands(StartCommand)] == ["agent.g1.StartCommand"]
    survivor.answer()
    assert _job(survivor, accepted.job_id).jobs[0].state == "succeeded"


def test_bad_vm_name_is_refused(h: Harness) -> None:
    """A VM name with spaces is refused at decode, naming the field and the allowed characters."""
    with pytest.raises(InvalidFieldError, match=r"\$\.name: .*letters, digits"):
        h.api(api.DeployVmRequest(name="my vm", offering="net2"))
