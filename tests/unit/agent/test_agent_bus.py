"""The agent on the in-process bus twin: management's view of announce, commands, reconnect."""

from __future__ import annotations

from typing import Any

import pytest

from hostdev.agent.config import parse_config
from hostdev.agent.daemon import Agent
from hostdev.agent.simulated import SimulatedHost
from hostdev.agent.startup_checks import check_host
from hostdev.messages.bus.contract import MGMT_QUEUE, Incoming
from hostdev.messages.bus.in_process import FakeClock, InProcessBroker, InProcessBus
from hostdev.messages.commands import (
    MigrateAnswer,
    MigrateCommand,
    PingRoutingCommand,
    StartAnswer,
    StartCommand,
    StartupAnswer,
    StartupRoutingCommand,
)
from hostdev.messages.pci_address import PciAddress as P
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

    def record(self, message: Any, incoming: Incoming) -> None:
        self.got.append((message, incoming))

    def startup(self, message: Any, incoming: Incoming) -> StartupAnswer:
        self.record(message, incoming)
        return StartupAnswer(host_id=1)

    def of(self, kind: type) -> list[tuple[Any, Incoming]]:
        return [(m, i) for m, i in self.got if isinstance(m, kind)]


def setup(host: SimulatedHost) -> tuple[InProcessBroker, FakeClock, Mgmt]:
    clock = FakeClock()
    broker = InProcessBroker(clock=clock)
    mgmt = Mgmt(broker)
    config = parse_config(f"guid={GUID}\nping.interval=30s\npci.devices={SAMPLE_DEVICES}\n"
                          f"libvirt.uri={host.uri}\n", "a.properties")
    agent = Agent(config, host, InProcessBus(broker=broker),
                  check_host(config, host.pci_devices(), host.domains()))
    agent.start()
    broker.drain()
    return broker, clock, mgmt


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
