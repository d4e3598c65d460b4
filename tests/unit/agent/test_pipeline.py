"""The agent's message pipeline: log context, sender, repeats, handler, errors, in order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import structlog
from prometheus_client import REGISTRY

from hostdev.agent.background import BackgroundCommands
from hostdev.agent.boot_sequence import BootSequence
from hostdev.agent.config import AgentConfig, parse_config
from hostdev.agent.daemon import Agent
from hostdev.agent.errors import HypervisorError, SenderRefused
from hostdev.agent.pipeline import CommandPipeline, check_sender
from hostdev.agent.recent_commands import RecentCommands
from hostdev.agent.simulated import SimulatedHost
from hostdev.agent.startup_checks import check_host
from hostdev.messages.base import Message
from hostdev.messages.bus.contract import MGMT_QUEUE, Incoming
from hostdev.messages.bus.dispatch import handle_delivery
from hostdev.messages.bus.in_process import FakeClock, InProcessBroker, InProcessBus
from hostdev.messages.codec import encode
from hostdev.messages.commands import (
    ErrorAnswer,
    MigrateAnswer,
    MigrateCommand,
    StartAnswer,
    StartCommand,
    StartupAnswer,
    StartupRoutingCommand,
    StopAnswer,
    StopCommand,
)
from hostdev.messages.errors import TransientError
from hostdev.messages.pci_address import PciAddress as P
from hostdev.messages.values import VmSpec
from tests.support.agent import SAMPLE_DEVICES, HostFactory

GUID = "repeat-guid-1"
VM = "77777777-aaaa-bbbb-cccc-000000000001"
STOP = StopCommand(vm_uuid=VM)


def delivery(message_id: str = "m-1", *, routing_key: str = f"agent.{GUID}.StopCommand",
             user_id: str | None = "hostdev-mgmt") -> Incoming:
    return Incoming(message_id=message_id, correlation_id="c-1", reply_to=None,
                    user_id=user_id, routing_key=routing_key, redelivered=False)


class LoopBus:
    """Collects what a background worker hands to the loop thread; ``run`` plays the loop."""

    def __init__(self) -> None:
        self.queued: list[Callable[[], None]] = []
        self.sent: list[tuple[Message, str | None]] = []

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        self.queued.append(fn)

    def send_to_mgmt(self, guid: str, message: Message, *, correlation_id: str | None = None,
                     message_id: str | None = None) -> str:
        self.sent.append((message, correlation_id))
        return "sent"

    def run(self) -> None:
        while self.queued:
            self.queued.pop(0)()


def pipeline(bus: LoopBus | None = None) -> CommandPipeline:
    recent = RecentCommands()
    return CommandPipeline(GUID, recent, BackgroundCommands(bus or LoopBus(), GUID, recent),
                           BootSequence())


def stopper(runs: list[str]) -> Callable[[StopCommand], StopAnswer]:
    def stop(command: StopCommand) -> StopAnswer:
        runs.append(command.vm_uuid)
        return StopAnswer(vm_uuid=command.vm_uuid, state="stopped", details=f"run {len(runs)}")
    return stop


def test_the_log_context_is_bound_around_the_handler() -> None:
    """The handler runs with message id, correlation id, host and VM bound to its log lines."""
    seen: dict[str, Any] = {}

    def stop(command: StopCommand) -> StopAnswer:
        seen.update(structlog.contextvars.get_contextvars())
        return StopAnswer(vm_uuid=command.vm_uuid)

    pipeline().command(stop)(STOP, delivery("m-ctx"))
    assert {k: seen.get(k) for k in ("message_id", "correlation_id", "host", "vm")} == {
        "message_id": "m-ctx", "correlation_id": "c-1", "host": GUID, "vm": VM}
    assert "message_id" not in structlog.contextvars.get_contextvars()


@pytest.mark.parametrize("routing_key", [
    "agent.other-guid.StopCommand", "mgmt.repeat-guid-1.StopCommand",
    "hostdev.agent.repeat-guid-1", f"agent.{GUID}"])
def test_a_message_off_the_agents_own_routing_keys_is_refused_unrun(routing_key: str) -> None:
    """Only agent.<own guid>.<Type> reaches a handler; anything else is SenderRefused."""
    runs: list[str] = []
    with pytest.raises(SenderRefused, match=f"only on agent.{GUID}.<Type>") as info:
        pipeline().command(stopper(runs))(STOP, delivery(routing_key=routing_key))
    assert runs == [] and info.value.code == "forbidden"


@pytest.mark.parametrize(("user_id", "refused"), [
    ("agent-other-guid", True), (f"agent-{GUID}", False), ("hostdev-mgmt", False),
    ("guest", False), (None, False)])
def test_another_agents_broker_user_is_refused(user_id: str | None, refused: bool) -> None:
    """A user_id naming another agent is refused; management's user, or none, is not."""
    if refused:
        with pytest.raises(SenderRefused, match="another agent"):
            check_sender(GUID, delivery(user_id=user_id))
    else:
        check_sender(GUID, delivery(user_id=user_id))


def test_the_sender_is_checked_before_a_repeat_is_answered() -> None:
    """A forged repeat of a known message id is refused, not given the remembered answer."""
    runs: list[str] = []
    handle = pipeline().command(stopper(runs))
    handle(STOP, delivery("m-1"))
    with pytest.raises(SenderRefused):
        handle(STOP, delivery("m-1", user_id="agent-other-guid"))
    assert runs == [VM]


def test_a_repeated_message_id_gets_the_first_answer_without_running_again() -> None:
    """The same id answers from memory; a new id runs the handler."""
    runs: list[str] = []
    handle = pipeline().command(stopper(runs))
    first = handle(STOP, delivery("m-1"))
    assert handle(STOP, delivery("m-1")) is first
    assert isinstance(first, StopAnswer) and first.details == "run 1"
    handle(STOP, delivery("m-2"))
    assert runs == [VM, VM]


def test_a_libvirt_failure_is_transient_and_not_remembered() -> None:
    """HypervisorError becomes TransientError (the bus redelivers); the redelivery runs."""
    calls: list[int] = []

    def stop(command: StopCommand) -> StopAnswer:
        calls.append(1)
        if len(calls) == 1:
            raise HypervisorError("lookup", "connection to libvirt lost")
        return StopAnswer(vm_uuid=command.vm_uuid)

    handle = pipeline().command(stop)
    with pytest.raises(TransientError, match="StopCommand: lookup failed: connection"):
        handle(STOP, delivery("m-1"))
    assert isinstance(handle(STOP, delivery("m-1")), StopAnswer) and len(calls) == 2


def test_a_permanent_libvirt_failure_is_answered_as_an_error_at_once() -> None:
    """A permanent HypervisorError is not redelivered: the answer says what failed, once."""
    calls: list[int] = []

    def stop(command: StopCommand) -> StopAnswer:
        calls.append(1)
        raise HypervisorError("lookup", "Invalid UUID", code=8, transient=False)

    handle = pipeline().command(stop)
    outcome = handle_delivery(
        encode(STOP), content_type=None, type_property="StopCommand",
        incoming=delivery("m-perm"), handlers={StopCommand: handle}, attempts=1,
        delivery_limit=5)
    assert outcome.action == "ack"
    answer = outcome.answer
    assert isinstance(answer, StopAnswer) and answer.result == "error"
    assert answer.vm_uuid == VM and "Invalid UUID (libvirt code 8)" in answer.details
    assert handle(STOP, delivery("m-perm")) == answer and calls == [1]


def test_a_refused_sender_becomes_a_forbidden_error_answer_on_the_bus() -> None:
    """Through the bus's dispatch, a refused command is dead-lettered with a typed answer."""
    handle = pipeline().command(stopper([]))
    outcome = handle_delivery(
        encode(STOP), content_type=None, type_property="StopCommand",
        incoming=delivery(user_id="agent-other-guid"), handlers={StopCommand: handle},
        attempts=1, delivery_limit=5)
    assert outcome.action == "dead"
    assert isinstance(outcome.answer, ErrorAnswer) and outcome.answer.code == "forbidden"
    assert outcome.route == ("hostdev.commands", f"mgmt.{GUID}.ErrorAnswer")
    assert "Traceback" not in outcome.answer.details


def test_a_command_is_timed_by_type_and_result() -> None:
    """Each command's run is observed in hostdev_agent_command_duration_seconds."""
    def count() -> float:
        return REGISTRY.get_sample_value("hostdev_agent_command_duration_seconds_count",
                                         {"type": "StopCommand", "result": "ok"}) or 0.0

    before = count()
    pipeline().command(stopper([]))(STOP, delivery("m-timed"))
    assert count() == before + 1


def test_a_long_command_answers_from_a_worker_and_its_repeat_from_memory() -> None:
    """The handler returns at once; once the worker answered, a repeat gets that answer."""
    bus, runs = LoopBus(), []

    def migrate(command: MigrateCommand) -> MigrateAnswer:
        runs.append(command.vm_uuid)
        return MigrateAnswer(vm_uuid=command.vm_uuid, details="first")

    steps = pipeline(bus)
    handle = steps.long_command(migrate, key=lambda m: m.vm_uuid)
    command = MigrateCommand(vm_uuid=VM, destination_guid="b", destination_uri="test:///b")
    migrate_delivery = delivery("m-3", routing_key=f"agent.{GUID}.MigrateCommand")
    assert handle(command, migrate_delivery) is None
    assert steps.background.wait_idle(5)
    bus.run()
    assert [(type(m).__name__, cid) for m, cid in bus.sent] == [("MigrateAnswer", "m-3")]
    again = handle(command, migrate_delivery)
    assert isinstance(again, MigrateAnswer) and again.details == "first"
    assert runs == [VM]


def test_an_answer_from_management_runs_without_answering_back() -> None:
    """StartupAnswer goes through the same checks and returns nothing."""
    got: list[StartupAnswer] = []
    handle = pipeline().answer(got.append)
    assert handle(StartupAnswer(host_id=1),
                  delivery("m-9", routing_key=f"agent.{GUID}.StartupAnswer")) is None
    assert [a.host_id for a in got] == [1]


def _management(broker: InProcessBroker) -> tuple[InProcessBus, list[tuple[Any, Incoming]]]:
    """A stand-in management on ``broker`` that registers agents and records their answers."""
    mgmt = InProcessBus(broker=broker)
    mgmt.connect()
    mgmt.declare_mgmt_queues()
    got: list[tuple[Any, Incoming]] = []
    mgmt.consume(MGMT_QUEUE, {
        StartupRoutingCommand: lambda m, i: StartupAnswer(host_id=1),
        StartAnswer: lambda m, i: got.append((m, i)),
        StopAnswer: lambda m, i: got.append((m, i))})
    return mgmt, got


def _config(host: SimulatedHost) -> AgentConfig:
    return parse_config(f"guid={GUID}\nping.interval=30s\npci.devices={SAMPLE_DEVICES}\n"
                        f"libvirt.uri={host.uri}\n", "a.properties")


@pytest.mark.libvirt
def test_a_start_repeated_after_a_stop_leaves_the_vm_stopped(make_host: HostFactory) -> None:
    """The outbox re-publishes a StartCommand (same id) after the stop: the VM stays off."""
    host: SimulatedHost = make_host()
    broker = InProcessBroker(clock=FakeClock())
    mgmt, got = _management(broker)
    config = _config(host)
    Agent(config, host, InProcessBus(broker=broker),
          check_host(config, host.pci_devices(), host.domains())).start()
    start = StartCommand(vm=VmSpec(uuid=VM, name="v", cpus=1, memory_mb=128,
                                   pci_devices=(P("28:00.1"),)))
    mgmt.send_to_agent(GUID, start, message_id="outbox-7")
    broker.drain()
    mgmt.send_to_agent(GUID, StopCommand(vm_uuid=VM, force=True), message_id="outbox-8")
    broker.drain()
    mgmt.send_to_agent(GUID, start, message_id="outbox-7")
    broker.drain()
    assert host.domain(VM).state == "stopped"  # type: ignore[union-attr]
    answers = [(type(m).__name__, i.correlation_id, m.result) for m, i in got]
    assert answers == [("StartAnswer", "outbox-7", "ok"), ("StopAnswer", "outbox-8", "ok"),
                       ("StartAnswer", "outbox-7", "ok")]


@pytest.mark.libvirt
def test_a_start_repeated_after_an_agent_restart_is_answered_not_run(
        make_host: HostFactory) -> None:
    """The memory of answers is on disk: a new Agent on the same state.dir answers the repeat."""
    host: SimulatedHost = make_host()
    broker = InProcessBroker(clock=FakeClock())
    mgmt, got = _management(broker)
    config = _config(host)

    def agent() -> Agent:
        started = Agent(config, host, InProcessBus(broker=broker),
                        check_host(config, host.pci_devices(), host.domains()))
        started.start()
        return started

    first = agent()
    start = StartCommand(vm=VmSpec(uuid=VM, name="v", cpus=1, memory_mb=128,
                                   pci_devices=(P("28:00.1"),)))
    mgmt.send_to_agent(GUID, start, message_id="c-start")
    broker.drain()
    mgmt.send_to_agent(GUID, StopCommand(vm_uuid=VM, force=True), message_id="c-stop")
    broker.drain()
    first.bus.close()
    second = agent()  # the restarted agent: a new boot, the same state.dir
    assert second.sequence.boot_id != first.sequence.boot_id
    assert second.pipeline.recent.answer_of("c-start") is not None  # read from state.dir
    mgmt.send_to_agent(GUID, start, message_id="c-start")
    broker.drain()
    assert host.domain(VM).state == "stopped"  # type: ignore[union-attr]
    answers = [(type(m).__name__, i.correlation_id, m.boot_id, m.seq) for m, i in got]
    assert answers[-1] == answers[0]  # the first answer, as the first boot numbered it
    assert [a[0] for a in answers] == ["StartAnswer", "StopAnswer", "StartAnswer"]
