"""Long commands on a worker thread: the handler returns at once, the answer follows."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from hostdev.agent.background import BackgroundCommands
from hostdev.agent.errors import HypervisorError
from hostdev.agent.recent_commands import RecentCommands
from hostdev.messages.base import Message
from hostdev.messages.bus.contract import Incoming
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


def delivery(message_id: str, *, redelivered: bool = False) -> Incoming:
    return Incoming(message_id=message_id, correlation_id=None, reply_to=None, user_id="mgmt",
                    routing_key="agent.guid-a.MigrateCommand", redelivered=redelivered)


COMMAND = MigrateCommand(vm_uuid="vm-1", destination_guid="b", destination_uri="test:///b")


def test_the_handler_returns_before_the_work_ends_and_the_answer_is_correlated() -> None:
    """The loop is free while the worker runs; the answer goes out from the loop."""
    bus, release = FakeBus(), threading.Event()

    def migrate(command: MigrateCommand) -> MigrateAnswer:
        release.wait(5)
        return MigrateAnswer(vm_uuid=command.vm_uuid)

    recent = RecentCommands()
    background = BackgroundCommands(bus, "guid-a", recent)
    start = background.runner(migrate, key=lambda m: m.vm_uuid)
    assert start(COMMAND, delivery("m-1")) is None
    assert background.running() == ("vm-1",)
    start(COMMAND, delivery("m-1", redelivered=True))  # dropped: still running
    release.set()
    assert background.wait_idle(5)
    bus.run_queued()
    assert [(guid, type(m).__name__, cid) for guid, m, cid in bus.sent] == [
        ("guid-a", "MigrateAnswer", "m-1")]
    assert recent.answer_of("m-1") is bus.sent[0][1]  # the pipeline answers repeats with it


def test_a_hypervisor_failure_publishes_nothing() -> None:
    """A worker whose libvirt failed answers nothing: management settles from reports."""
    bus = FakeBus()

    def migrate(command: MigrateCommand) -> MigrateAnswer:
        raise HypervisorError("migrate", "connection to libvirt lost")

    recent = RecentCommands()
    background = BackgroundCommands(bus, "guid-a", recent)
    background.runner(migrate, key=lambda m: m.vm_uuid)(COMMAND, delivery("m-2"))
    assert background.wait_idle(5)
    bus.run_queued()
    assert bus.sent == [] and len(recent) == 0
