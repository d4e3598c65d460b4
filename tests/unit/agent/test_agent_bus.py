"""The agent on the in-process bus twin: management's view of announce, commands, reconnect."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from hostdev.agent.config import parse_config
from hostdev.agent.daemon import Agent
from hostdev.agent.simulated import SimulatedHost
from hostdev.agent.startup_checks import check_host
from hostdev.messages.bus.contract import MGMT_QUEUE, Incoming
from hostdev.messages.bus.in_process import FakeClock, InProcessBroker, InProcessBus
from hostdev.messages.commands import (
    ErrorAnswer,
    MigrateAnswer,
    MigrateCommand,
    PingRoutingCommand,
    StartAnswer,
    StartCommand,
    StartupAnswer,
    StartupRoutingCommand,
)
from hostdev.messages.pci_address import PciAddress as P
from hostdev.messages.runtime.backoff import Backoff
from hostdev.messages.values import VmSpec
from tests.support.agent import SAMPLE_DEVICES, HostFactory
from tests.support.waiting import wait_for

pytestmark = pytest.mark.libvirt

GUID = "bus-guid-1"
VM = "66666666-aaaa-bbbb-cccc-000000000001"


class Mgmt:
    """Management's side: records what arrives on hostdev.mgmt and answers start-ups."""

    def __init__(self, broker: InProcessBroker) -> None:
        self.bus = InProcessBus(broker=broker)
        self.bus.connect()
        self.bus.declare_mgmt_queues()
        self.got: list[tuple[Any, Incoming]] = []
        record = self.record
        self.bus.consume(MGMT_QUEUE, {StartupRoutingCommand: self.startup,
                                      PingRoutingCommand: record, StartAnswer: record,
                                      MigrateAnswer: record})

    @staticmethod
    def declare_topology(broker: InProcessBroker) -> None:
        """Declares the exchanges without management's queues, as a fresh broker has them."""
        bus = InProcessBus(broker=broker)
        bus.connect()
        bus.close()

    def record(self, message: Any, incoming: Incoming) -> None:
        self.got.append((message, incoming))

    def startup(self, message: Any, incoming: Incoming) -> StartupAnswer:
        self.record(message, incoming)
        return StartupAnswer(host_id=1)

    def of(self, kind: type) -> list[tuple[Any, Incoming]]:
        return [(m, i) for m, i in self.got if isinstance(m, kind)]


def start_agent(host: SimulatedHost, broker: InProcessBroker) -> Agent:
    config = parse_config(f"guid={GUID}\nping.interval=30s\npci.devices={SAMPLE_DEVICES}\n",
                          "a.properties")
    agent = Agent(config, host, InProcessBus(broker=broker),
                  check_host(config, host.pci_devices(), host.domains()),
                  announce_backoff=Backoff(first_s=1.0, max_s=8.0))
    agent.start()
    broker.drain()
    return agent


def setup(host: SimulatedHost) -> tuple[InProcessBroker, FakeClock, Mgmt]:
    clock = FakeClock()
    broker = InProcessBroker(clock=clock)
    mgmt = Mgmt(broker)
    start_agent(host, broker)
    return broker, clock, mgmt


def advance_until(broker: InProcessBroker, clock: FakeClock, done: Any,
                  limit_s: float = 120.0) -> float:
    """Moves the fake clock in half seconds until ``done()``; returns the time it took."""
    waited = 0.0
    while not done():
        assert waited < limit_s, f"not done after {limit_s} s of fake time"
        clock.advance(0.5)
        waited += 0.5
        broker.drain()
    return waited


def test_the_agent_announces_and_accepts_the_startup_answer(make_host: HostFactory) -> None:
    """Management gets StartupRoutingCommand; the StartupAnswer back is not dead-lettered."""
    broker, _clock, mgmt = setup(make_host())
    ((startup, incoming),) = mgmt.of(StartupRoutingCommand)
    assert incoming.routing_key == f"mgmt.{GUID}.StartupRoutingCommand"
    assert [d.name for d in startup.pci_devices] == ["10GE", "10GE", "GPU"]
    assert broker.dead_letters() == []


def test_commands_are_answered_to_mgmt_with_the_correlation_id(make_host: HostFactory) -> None:
    """A StartCommand's answer comes back on mgmt.<guid>.StartAnswer, correlated."""
    broker, _clock, mgmt = setup(make_host())
    command_id = mgmt.bus.send_to_agent(GUID, StartCommand(vm=VmSpec(
        uuid=VM, name="v", cpus=1, memory_mb=128, pci_devices=(P("28:00.1"),))))
    broker.drain()
    ((answer, incoming),) = mgmt.of(StartAnswer)
    assert answer.ok and answer.hostdevs == (P("28:00.1"),)
    assert incoming.correlation_id == command_id
    assert incoming.routing_key == f"mgmt.{GUID}.StartAnswer"


def test_a_refused_detach_answer_reaches_mgmt(make_host: HostFactory) -> None:
    """MigrateAnswer with the refusing device travels back through the bus."""
    broker, _clock, mgmt = setup(make_host(refuse_detach=["28:00.2"]))
    mgmt.bus.send_to_agent(GUID, StartCommand(vm=VmSpec(
        uuid=VM, name="v", cpus=1, memory_mb=128, pci_devices=(P("28:00.1"), P("28:00.2")))))
    mgmt.bus.send_to_agent(GUID, MigrateCommand(
        vm_uuid=VM, destination_guid="b", destination_uri="simulated:///b.json",
        detach_timeout_s=0.05))
    # The agent migrates on a worker thread and answers through the loop (agent/background.py).
    wait_for(lambda: broker.drain() >= 0 and mgmt.of(MigrateAnswer), timeout=10,
             what="the MigrateAnswer")
    ((answer, _),) = mgmt.of(MigrateAnswer)
    assert answer.refused_device == P("28:00.2") and answer.reattached == (P("28:00.1"),)


def test_pings_follow_the_clock_and_reconnects_reannounce(make_host: HostFactory) -> None:
    """A ping each ping.interval; a simulated reconnect sends StartupRoutingCommand again."""
    broker, clock, mgmt = setup(make_host())
    assert mgmt.of(PingRoutingCommand) == []
    clock.advance(30)
    broker.drain()
    assert len(mgmt.of(PingRoutingCommand)) == 1
    broker.disconnect_all()
    broker.drain()
    assert len(mgmt.of(StartupRoutingCommand)) == 2


def test_an_agent_started_before_management_registers_once_it_comes_up(
        make_host: HostFactory) -> None:
    """Unanswered announcements repeat with growing delays until a StartupAnswer arrives."""
    clock = FakeClock()
    broker = InProcessBroker(clock=clock)
    Mgmt.declare_topology(broker)
    agent = start_agent(make_host(), broker)
    assert not agent.registered and agent.announcements == 1
    advance_until(broker, clock, lambda: agent.announcements >= 4)
    assert not agent.registered
    mgmt = Mgmt(broker)
    advance_until(broker, clock, lambda: agent.registered, limit_s=10.0)
    assert len(mgmt.of(StartupRoutingCommand)) == 1
    before = agent.announcements
    clock.advance(60)
    broker.drain()
    assert agent.announcements == before, "announced again after the StartupAnswer"


def test_the_repeats_back_off_up_to_the_ceiling(make_host: HostFactory) -> None:
    """Without management the gaps double from 1 s and stop growing at the 8 s ceiling."""
    clock = FakeClock()
    broker = InProcessBroker(clock=clock)
    agent = start_agent(make_host(), broker)
    gaps = []
    for count in range(2, 8):
        gaps.append(advance_until(broker, clock, lambda c=count: agent.announcements >= c))
    # Delays are drawn in [d/2, d] for d = 1, 2, 4, 8, 8, 8 and checked every 0.5 s.
    for gap, ceiling in zip(gaps, (1, 2, 4, 8, 8, 8), strict=True):
        assert ceiling / 2 - 0.5 <= gap <= ceiling + 0.5, gaps


def test_an_error_answer_is_logged_once_and_acked(make_host: HostFactory) -> None:
    """Management's ErrorAnswer is not dead-lettered by the agent; one warning names it."""
    broker, _clock, mgmt = setup(make_host())
    with capture_logs() as logs:
        mgmt.bus.send_to_agent(GUID, ErrorAnswer(code="forbidden", details="not your VM"))
        broker.drain()
    assert broker.dead_letters() == []
    (record,) = [r for r in logs if r["event"] == "error_answer_received"]
    assert (record["code"], record["details"], record["log_level"]) == (
        "forbidden", "not your VM", "warning")


def test_a_start_with_an_invalid_uuid_is_answered_once_not_retried(
        make_host: HostFactory) -> None:
    """libvirt's "invalid UUID" is permanent: one error answer, no redelivery, no dead letter."""
    broker, _clock, mgmt = setup(make_host())
    command_id = mgmt.bus.send_to_agent(GUID, StartCommand(vm=VmSpec(
        uuid="not-a-uuid", name="v", cpus=1, memory_mb=128)))
    with capture_logs() as logs:
        broker.drain()
    ((answer, incoming),) = mgmt.of(StartAnswer)
    assert incoming.correlation_id == command_id
    assert answer.result == "error" and "libvirt code 8" in answer.details
    assert broker.dead_letters() == []
    assert [r for r in logs if r["event"] == "message_requeued"] == []
