"""Management believes an agent only about its own host: forged answers and takeover reports."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from hostdev.messages import api
from hostdev.messages.commands import (
    PingRoutingCommand,
    StartCommand,
    StopAnswer,
    StopCommand,
)
from hostdev.messages.events import ForeignDomainFound
from hostdev.messages.values import DomainInfo
from hostdev.mgmt.errors import ForgedAnswer
from hostdev.mgmt.persistence.models import Host, Job, PciDevice, VmInstance
from tests.support.mgmt_harness import Harness, devices


@pytest.fixture
def h(engine: Engine) -> Harness:
    """Two hosts with 2 x 10GE each; VM a runs on g1, VM b on g2; a stop of a is pending."""
    harness = Harness(engine)
    harness.register("g1", "h1", devices(2))
    harness.register("g2", "h2", devices(2))
    assert isinstance(harness.api(api.CreateOfferingRequest(
        name="net2", cpus=2, memory_mb=1024, pci_devices="10GE,10GE")), api.OfferingList)
    for name in ("a", "b"):
        assert isinstance(harness.api(api.DeployVmRequest(name=name, offering="net2")),
                          api.JobAccepted)
    assert [p.routing_key for p in harness.commands(StartCommand)] == [
        "agent.g1.StartCommand", "agent.g2.StartCommand"]
    harness.answer()
    assert isinstance(harness.api(api.StopVmRequest(vm="a")), api.JobAccepted)
    return harness


def _state(engine: Engine) -> tuple[list[tuple[str, str, int | None]], list[tuple[str, int | None]],
                                    list[tuple[str, str, str | None]]]:
    """Returns the rows a forgery must not change: VMs, devices, jobs."""
    with Session(engine) as session:
        vms = [tuple(r) for r in session.execute(
            select(VmInstance.name, VmInstance.state, VmInstance.host_id)
            .order_by(VmInstance.id))]
        pci = [tuple(r) for r in session.execute(
            select(PciDevice.state, PciDevice.instance_id).order_by(PciDevice.id))]
        jobs = [tuple(r) for r in session.execute(
            select(Job.kind, Job.state, Job.command_id).order_by(Job.id))]
    return vms, pci, jobs  # type: ignore[return-value]


def _uuid(engine: Engine, name: str) -> str:
    with Session(engine) as session:
        uuid = session.scalar(select(VmInstance.uuid).where(VmInstance.name == name))
    assert uuid is not None
    return uuid


def test_a_guessed_id_is_refused_and_changes_nothing(h: Harness, engine: Engine) -> None:
    """StopAnswers from g2 with guessed ids for g1's VM: dead-lettered, nothing changes."""
    before = _state(engine)
    for guess in ("outbox-1", "outbox-7", "0" * 32):
        with pytest.raises(ForgedAnswer, match="no command management sent"):
            h.from_agent("g2", StopAnswer(vm_uuid=_uuid(engine, "a"), state="stopped"),
                         correlation_id=guess, user_id="agent-g2")
    with pytest.raises(ForgedAnswer, match="carries no correlation_id"):
        h.from_agent("g2", StopAnswer(vm_uuid=_uuid(engine, "a"), state="stopped"),
                     user_id="agent-g2")
    assert _state(engine) == before


def test_the_observed_id_of_another_hosts_command_is_refused(h: Harness, engine: Engine) -> None:
    """g2 answering the stop that went to g1 (an id it saw) is refused, naming both hosts."""
    (stop,) = h.commands(StopCommand)
    before = _state(engine)
    with pytest.raises(ForgedAnswer, match=r"from host g2 .*which went to host g1"):
        h.from_agent("g2", StopAnswer(vm_uuid=_uuid(engine, "a"), state="stopped"),
                     correlation_id=stop.message_id, user_id="agent-g2")
    assert _state(engine) == before
    h.answer()  # g1's own answer still counts
    assert _state(engine)[0][0][1] == "Stopped"


def test_its_own_command_id_for_another_hosts_vm_is_refused(h: Harness, engine: Engine) -> None:
    """g2 reuses the id of its own stop command in an answer naming g1's VM: refused."""
    assert isinstance(h.api(api.StopVmRequest(vm="b")), api.JobAccepted)
    own = next(p for p in h.commands(StopCommand) if p.routing_key.startswith("agent.g2."))
    before = _state(engine)
    with pytest.raises(ForgedAnswer, match="concerns VM"):
        h.from_agent("g2", StopAnswer(vm_uuid=_uuid(engine, "a"), state="stopped"),
                     correlation_id=own.message_id, user_id="agent-g2")
    assert _state(engine) == before


def test_a_late_answer_of_the_right_host_changes_nothing(h: Harness, engine: Engine) -> None:
    """The same StopAnswer again after the job finished is logged, not refused."""
    (stop,) = h.commands(StopCommand)
    h.answer()
    after = _state(engine)
    h.from_agent("g1", StopAnswer(vm_uuid=_uuid(engine, "a"), state="stopped"),
                 correlation_id=stop.message_id, user_id="agent-g1")
    assert _state(engine) == after


def test_command_ids_are_random(h: Harness) -> None:
    """Commands carry 32 hex digits, not a row number."""
    ids = [p.message_id for p in h.bus.published]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids) and len(set(ids)) == len(ids)


def _foreign(engine: Engine, guid: str) -> int:
    with Session(engine) as session:
        count = session.scalar(select(Host.foreign_domains).where(Host.guid == guid))
    assert count is not None
    return count


def test_a_takeover_ping_is_recorded_as_foreign(h: Harness, engine: Engine) -> None:
    """g2 lists g1's stopped VM as running: it stays Stopped, g2 has one foreign domain."""
    h.answer()  # a is Stopped (last on g1)
    uuid = _uuid(engine, "a")
    before = _state(engine)
    stolen = DomainInfo(uuid=uuid, name="a", state="running", hostdevs=())
    for _ in range(2):
        h.from_agent("g2", PingRoutingCommand(
            guid="g2", domains=(stolen, *h.domains["g2"].values())), user_id="agent-g2")
    assert _state(engine) == before
    assert _foreign(engine, "g2") == 1 and _foreign(engine, "g1") == 0
    found = [p for p in h.bus.published if isinstance(p.message, ForeignDomainFound)]
    assert [(p.routing_key, p.message.vm_uuid) for p in found] == [  # once, not per ping
        ("host.g2.ForeignDomain", uuid)]
    hosts = h.api(api.ListHostsRequest())
    assert isinstance(hosts, api.HostList)
    assert [(r.guid, r.foreign_domains) for r in hosts.hosts] == [("g1", 0), ("g2", 1)]
    h.ping("g2")  # the next complete report without it clears the record
    assert _foreign(engine, "g2") == 0


def test_a_running_vm_of_another_host_is_not_moved(h: Harness, engine: Engine) -> None:
    """g1 lists g2's running VM b: b stays on g2, g1 records it as foreign."""
    before = _state(engine)
    b = h.domains["g2"][_uuid(engine, "b")]
    h.from_agent("g1", PingRoutingCommand(guid="g1", domains=(*h.domains["g1"].values(), b)),
                 user_id="agent-g1")
    assert _state(engine) == before
    assert _foreign(engine, "g1") == 1


def test_an_unknown_domain_at_start_up_is_foreign_not_adopted(h: Harness,
                                                              engine: Engine) -> None:
    """A domain management never heard of is counted, whatever its state; no VM is created."""
    h.domains["g2"]["f" * 8] = DomainInfo(uuid="f" * 8, name="rogue", state="stopped")
    before = _state(engine)
    h.register("g2", "h2", devices(2))
    assert _state(engine) == before
    assert _foreign(engine, "g2") == 1


def test_a_request_without_message_id_is_handled_each_time(h: Harness, engine: Engine) -> None:
    """Two identical StopVmRequests without an id are two requests, not a redelivery."""
    h.answer()
    for _ in range(2):
        assert isinstance(h.api(api.StartVmRequest(vm="a"), without_id=True), api.JobAccepted)
        h.answer()
        stop = h.api(api.StopVmRequest(vm="a"), without_id=True)
        assert isinstance(stop, api.JobAccepted), stop
        h.answer()
    with Session(engine) as session:
        assert session.scalars(select(Job.kind).order_by(Job.id)).all()[-4:] == [
            "start", "stop", "start", "stop"]
