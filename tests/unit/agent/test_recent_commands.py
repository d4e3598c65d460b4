"""A command repeated with the same message id is answered again, not run again."""

from __future__ import annotations

from typing import Any

import pytest

from hostdev.agent.config import parse_config
from hostdev.agent.daemon import Agent
from hostdev.agent.recent_commands import RecentCommands
from hostdev.agent.simulated import SimulatedHost
from hostdev.agent.startup_checks import check_host
from hostdev.messages.bus.contract import MGMT_QUEUE, Incoming
from hostdev.messages.bus.in_process import FakeClock, InProcessBroker, InProcessBus
from hostdev.messages.commands import (
    StartAnswer,
    StartCommand,
    StartupAnswer,
    StartupRoutingCommand,
    StopAnswer,
    StopCommand,
)
from hostdev.messages.pci_address import PciAddress as P
from hostdev.messages.values import VmSpec
from tests.support.agent import SAMPLE_DEVICES, HostFactory

GUID = "repeat-guid-1"
VM = "77777777-aaaa-bbbb-cccc-000000000001"


def test_the_answer_of_a_known_id_is_returned_and_the_oldest_forgotten() -> None:
    """Answers are kept by message id up to the size; ids without value are never kept."""
    recent = RecentCommands(size=2)
    first, second, third = (StopAnswer(vm_uuid=f"vm{n}") for n in range(3))
    recent.remember("a", first)
    recent.remember("b", second)
    recent.remember(None, third)
    assert recent.answer_of("a") is first and recent.answer_of(None) is None
    recent.remember("c", third)
    assert (recent.answer_of("a"), recent.answer_of("c"), len(recent)) == (None, third, 2)


def test_a_size_below_one_is_refused() -> None:
    """A memory of no answers would silently drop nothing: refused with the reason."""
    with pytest.raises(ValueError, match="at least one"):
        RecentCommands(size=0)


@pytest.mark.libvirt
def test_a_start_repeated_after_a_stop_leaves_the_vm_stopped(make_host: HostFactory) -> None:
    """The outbox re-publishes a StartCommand (same id) after the stop: the VM stays off."""
    host: SimulatedHost = make_host()
    broker = InProcessBroker(clock=FakeClock())
    mgmt = InProcessBus(broker=broker)
    mgmt.connect()
    mgmt.declare_mgmt_queues()
    got: list[tuple[Any, Incoming]] = []
    mgmt.consume(MGMT_QUEUE, {
        StartupRoutingCommand: lambda m, i: StartupAnswer(host_id=1),
        StartAnswer: lambda m, i: got.append((m, i)),
        StopAnswer: lambda m, i: got.append((m, i))})
    config = parse_config(f"guid={GUID}\nping.interval=30s\npci.devices={SAMPLE_DEVICES}\n",
                          "a.properties")
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
