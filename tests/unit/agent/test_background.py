"""Long commands on a worker thread: the handler returns at once, the answer follows."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from hostdev.agent.background import BackgroundCommands
from hostdev.agent.errors import HypervisorError
from hostdev.messages.base import Message
from hostdev.messages.commands import MigrateAnswer, MigrateCommand


@dataclass
class FakeBus:
    """Collects queued calls; ``run_queued`` plays the loop thread."""

    queued: list[Callable[[], None]] = field(default_factory=list)
    sent: list[tuple[str, Message, str | None]] = field(default_factory=list)

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        self.queued.append(fn)

    def send_to_mgmt(self, guid: str, message: Message, *, correlation_id: str | None = None,
                     message_id: str | None = None) -> str:
        self.sent.append((guid, message, correlation_id))
        return "sent"

    def run_queued(self) -> None:
        while self.queued:
            self.queued.pop(0)()


@dataclass
class Delivery:
    """The delivery facts the handler reads."""

    message_id: str
    correlation_id: str | None = None
    redelivered: bool = False


COMMAND = MigrateCommand(vm_uuid="vm-1", destination_guid="b", destination_uri="test:///b")


def test_the_handler_returns_before_the_work_ends_and_the_answer_is_correlated() -> None:
    """The loop is free while the worker runs; the answer goes out from the loop."""
    bus, release = FakeBus(), threading.Event()

    def migrate(command: MigrateCommand) -> MigrateAnswer:
        release.wait(5)
        return MigrateAnswer(vm_uuid=command.vm_uuid)

    background = BackgroundCommands(bus, "guid-a")
    handle = background.handler(migrate, key=lambda m: m.vm_uuid)
    assert handle(COMMAND, Delivery("m-1")) is None
    assert background.running() == ("vm-1",)
    handle(COMMAND, Delivery("m-1", redelivered=True))  # dropped: still running
    release.set()
    assert background.wait_idle(5)
    bus.run_queued()
    assert [(guid, type(m).__name__, cid) for guid, m, cid in bus.sent] == [
        ("guid-a", "MigrateAnswer", "m-1")]


def test_a_hypervisor_failure_publishes_nothing() -> None:
    """A worker whose libvirt failed answers nothing: management settles from reports."""
    bus = FakeBus()

    def migrate(command: MigrateCommand) -> MigrateAnswer:
        raise HypervisorError("migrate", "connection to libvirt lost")

    background = BackgroundCommands(bus, "guid-a")
    background.handler(migrate, key=lambda m: m.vm_uuid)(COMMAND, Delivery("m-2"))
    assert background.wait_idle(5)
    bus.run_queued()
    assert bus.sent == []


def test_a_repeated_command_gets_the_first_answer_without_running_again() -> None:
    """The same message id after the answer: answered from memory, no second migration."""
    from hostdev.agent.recent_commands import RecentCommands

    bus, runs = FakeBus(), []

    def migrate(command: MigrateCommand) -> MigrateAnswer:
        runs.append(command.vm_uuid)
        return MigrateAnswer(vm_uuid=command.vm_uuid, details="first")

    background = BackgroundCommands(bus, "guid-a", recent=RecentCommands())
    handle = background.handler(migrate, key=lambda m: m.vm_uuid)
    handle(COMMAND, Delivery("m-3"))
    assert background.wait_idle(5)
    bus.run_queued()
    again = handle(COMMAND, Delivery("m-3"))
    assert isinstance(again, MigrateAnswer) and again.details == "first"
    assert runs == ["vm-1"]
