"""The bus over the link contract: what LinkBus asks of a link, in which order.

A recording link stands in for a transport, so these tests pin the seam:
the shared handling (answers, dead letters, requeues, delivery counting,
stale deliveries) and the loop's recovery, independently of any broker.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from hostdev.messages.base import Message
from hostdev.messages.bus.contract import (
    COMMANDS_EXCHANGE,
    DEAD_EXCHANGE,
    HEADER_LIMIT,
    BusConfig,
)
from hostdev.messages.bus.core import LinkBus
from hostdev.messages.bus.link import Link, Stopped
from hostdev.messages.bus.wire import Delivery, Outgoing
from hostdev.messages.codec import decode, encode
from hostdev.messages.commands import ErrorAnswer, StopAnswer, StopCommand
from hostdev.messages.errors import BusError, TransientError


class Lost(Exception):
    """The recording link's "connection lost"."""


class RecordingLink:
    """A link that records every call the bus makes and delivers what a test queues."""

    recoverable: tuple[type[BaseException], ...] = (Lost,)

    def __init__(self) -> None:
        self.config = BusConfig(url="amqp://alice:pw@host//", app_id="test-app")
        self.user_id = "alice"
        self.calls: list[tuple[str, Any]] = []
        self.inbox: deque[Delivery | BaseException] = deque()
        self.current = True
        self.recover_raises: BaseException | None = None
        self.now = 0.0
        self._reconnected: list[Callable[[], None]] = []
        self.publishes_dead_letters = True

    @property
    def connected(self) -> bool:
        return True

    def clock(self) -> float:
        return self.now

    def connect(self) -> None:
        self.calls.append(("connect", None))

    def close(self) -> None:
        self.calls.append(("close", None))

    def declare(self, queue: str, exchange: str, bindings: tuple[str, ...]) -> None:
        self.calls.append(("declare", (queue, exchange, bindings)))

    def consume(self, queue: str) -> None:
        self.calls.append(("consume", queue))

    def send(self, outgoing: Outgoing) -> None:
        self.calls.append(("send", outgoing))

    def wait_confirms(self, timeout: float) -> None:
        self.calls.append(("wait_confirms", timeout))

    def request(self, message: Message, timeout: float) -> Message:
        raise NotImplementedError

    def take(self) -> Delivery | None:
        if not self.inbox:
            return None
        item = self.inbox.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    def wait(self, timeout: float) -> None:
        self.calls.append(("wait", None))

    def wake(self) -> None:
        pass

    def ack(self, delivery: Delivery) -> None:
        self.calls.append(("ack", delivery.token))

    def requeue(self, delivery: Delivery) -> None:
        self.calls.append(("requeue", delivery.token))

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.calls.append(("dead_letter", reason))

    def reject(self, delivery: Delivery, reason: str) -> None:
        self.calls.append(("reject", reason))

    def is_current(self, delivery: Delivery) -> bool:
        return self.current

    def flush(self) -> None:
        self.calls.append(("flush", None))

    def recover(self, error: BaseException, stopping: threading.Event) -> None:
        self.calls.append(("recover", repr(error)))
        if self.recover_raises is not None:
            raise self.recover_raises
        for fn in self._reconnected:
            fn()

    def on_reconnect(self, fn: Callable[[], None]) -> None:
        self._reconnected.append(fn)

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls if kind not in ("wait", "flush")]

    def sent(self) -> list[Outgoing]:
        return [arg for kind, arg in self.calls if kind == "send"]


def _delivery(message: Message, *, token: int = 1, redelivered: bool = False,
              headers: dict[str, Any] | None = None, mid: str = "m-1") -> Delivery:
    return Delivery(body=encode(message), properties={"message_id": mid},
                    headers=headers or {}, routing_key="agent.g1.StopCommand",
                    redelivered=redelivered, queue="hostdev.agent.g1", token=token)


@pytest.fixture
def link() -> RecordingLink:
    return RecordingLink()


def _bus(link: RecordingLink, handler: Callable[[Any, Any], Message | None]) -> LinkBus:
    bus = LinkBus(link.config, link)
    bus.consume("hostdev.agent.g1", {StopCommand: handler})
    link.calls.clear()
    return bus


def test_the_recording_link_satisfies_the_link_protocol(link: RecordingLink) -> None:
    """The stand-in implements the whole contract, so the seam tested is the real one."""
    typed: Link = link
    assert typed.user_id == "alice"


def test_an_answer_is_sent_on_its_route_before_the_ack(link: RecordingLink) -> None:
    """A handler's answer goes back mirrored (agent -> mgmt) with the correlation id, then ack."""
    bus = _bus(link, lambda m, i: StopAnswer(vm_uuid=m.vm_uuid))
    link.inbox.append(_delivery(StopCommand(vm_uuid="vm-1")))
    assert bus.step() is True
    assert link.kinds() == ["send", "ack"]
    (answer,) = link.sent()
    assert (answer.exchange, answer.routing_key) == (COMMANDS_EXCHANGE, "mgmt.g1.StopAnswer")
    assert answer.properties["correlation_id"] == "m-1"
    assert answer.properties["user_id"] == "alice"
    assert answer.properties["app_id"] == "test-app"
    assert decode(answer.body) == StopAnswer(vm_uuid="vm-1")


def test_a_failing_handler_is_dead_lettered_answered_with_an_error_then_acked(
        link: RecordingLink) -> None:
    """Dead letter first (with the reason), then the ErrorAnswer, then the ack."""
    def boom(message: Any, incoming: Any) -> None:
        raise RuntimeError("libvirt said no")

    bus = _bus(link, boom)
    link.inbox.append(_delivery(StopCommand(vm_uuid="vm-1")))
    bus.step()
    assert link.kinds() == ["dead_letter", "send", "ack"]
    assert "RuntimeError: libvirt said no" in link.calls[0][1]
    error = decode(link.sent()[0].body)
    assert isinstance(error, ErrorAnswer) and error.code == "internal"


def test_transient_failures_are_requeued_until_the_delivery_limit(link: RecordingLink) -> None:
    """The bus counts redeliveries itself (no broker count) and dead-letters on the limit."""
    def busy(message: Any, incoming: Any) -> None:
        raise TransientError("libvirt busy")

    link.config = BusConfig(delivery_limit=3)
    bus = _bus(link, busy)
    command = StopCommand(vm_uuid="vm-1")
    link.inbox.extend([_delivery(command, token=1), _delivery(command, token=2, redelivered=True),
                       _delivery(command, token=3, redelivered=True)])
    while bus.step():
        pass
    settled = [call for call in link.calls if call[0] in ("requeue", "ack")]
    assert settled == [("requeue", 1), ("requeue", 2), ("ack", 3)]
    assert link.kinds()[-3:] == ["dead_letter", "send", "ack"]
    assert "on each of 3 deliveries" in link.calls[-3][1]


def test_a_broker_delivery_count_over_the_limit_is_dead_lettered_unanswered(
        link: RecordingLink) -> None:
    """x-delivery-count beyond the limit: rejected for the broker to dead-letter, unhandled.

    No copy is published and no answer sent: either could be what killed the
    connection each time the message was delivered.
    """
    ran: list[Any] = []
    bus = _bus(link, lambda m, i: ran.append(m))
    link.inbox.append(_delivery(StopCommand(vm_uuid="vm-1"), redelivered=True,
                                headers={"x-delivery-count": 7}))
    bus.step()
    assert ran == []
    assert link.kinds() == ["reject"]
    assert "without being settled" in link.calls[0][1]


def test_a_huge_handler_error_gives_a_capped_reason_and_answer(link: RecordingLink) -> None:
    """A 1 MB exception text becomes a reason of at most 4 KB, marked as cut."""
    def boom(message: Any, incoming: Any) -> None:
        raise RuntimeError("x" * 1_000_000)

    bus = _bus(link, boom)
    link.inbox.append(_delivery(StopCommand(vm_uuid="vm-1")))
    bus.step()
    assert link.kinds() == ["dead_letter", "send", "ack"]
    reason = link.calls[0][1]
    assert len(reason.encode()) <= HEADER_LIMIT
    assert reason.endswith("bytes in all]") and "[cut:" in reason
    error = decode(link.sent()[0].body)
    assert isinstance(error, ErrorAnswer) and error.details == reason


def test_a_login_without_dead_letter_rights_rejects_instead(link: RecordingLink) -> None:
    """An agent's user settles a dead letter by rejecting it; the ErrorAnswer still goes."""
    def boom(message: Any, incoming: Any) -> None:
        raise RuntimeError("no")

    link.publishes_dead_letters = False
    bus = _bus(link, boom)
    link.inbox.append(_delivery(StopCommand(vm_uuid="vm-1")))
    bus.step()
    assert link.kinds() == ["reject", "send"]
    assert "RuntimeError: no" in link.calls[0][1]


def test_an_expected_refusal_logs_one_line_without_traceback(link: RecordingLink) -> None:
    """An error carrying a code is a refusal: no handler_failed traceback, one dead-letter line."""
    class Refused(Exception):
        code = "forbidden"

    def refuse(message: Any, incoming: Any) -> None:
        raise Refused("not your host")

    bus = _bus(link, refuse)
    link.inbox.append(_delivery(StopCommand(vm_uuid="vm-1")))
    with capture_logs() as logs:
        bus.step()
    assert [entry["event"] for entry in logs] == ["message_dead_lettered"]
    assert logs[0]["code"] == "forbidden" and "exc_info" not in logs[0]


def test_an_unexpected_error_logs_its_traceback(link: RecordingLink) -> None:
    """A bug (no code) still logs handler_failed with the traceback."""
    def boom(message: Any, incoming: Any) -> None:
        raise KeyError("bug")

    bus = _bus(link, boom)
    link.inbox.append(_delivery(StopCommand(vm_uuid="vm-1")))
    with capture_logs() as logs:
        bus.step()
    assert [entry["event"] for entry in logs] == ["handler_failed", "message_dead_lettered"]
    assert logs[0]["exc_info"] is True


def test_a_stale_delivery_is_answered_but_not_dead_lettered(link: RecordingLink) -> None:
    """When the connection changed meanwhile, the answer still goes out; no dead letter."""
    def boom(message: Any, incoming: Any) -> None:
        raise RuntimeError("no")

    bus = _bus(link, lambda m, i: StopAnswer(vm_uuid=m.vm_uuid))
    link.current = False
    link.inbox.append(_delivery(StopCommand(vm_uuid="vm-1")))
    bus.step()
    assert link.kinds() == ["send", "ack"]
    link.calls.clear()
    bus.consume("hostdev.agent.g1", {StopCommand: boom})
    link.calls.clear()
    link.inbox.append(_delivery(StopCommand(vm_uuid="vm-2"), token=2))
    bus.step()
    assert link.kinds() == ["ack"]


def test_a_lost_connection_is_recovered_and_the_callbacks_run_in_the_loop(
        link: RecordingLink) -> None:
    """A recoverable error from the link makes run() recover, then run on_reconnect callbacks."""
    bus = LinkBus(link.config, link)
    ran: list[str] = []
    bus.on_reconnect(lambda: (ran.append("reconnected"), bus.stop()))
    link.inbox.append(Lost("socket closed"))
    bus.run(timeout=5)
    assert ("recover", "Lost('socket closed')") in link.calls
    assert ran == ["reconnected"]
    assert link.calls[-1] == ("flush", None)


def test_stopped_during_recovery_ends_run(link: RecordingLink) -> None:
    """Stopped from recover() ends run() quietly, and the acks are flushed."""
    bus = LinkBus(link.config, link)
    link.inbox.append(Lost("gone"))
    link.recover_raises = Stopped()
    bus.run(timeout=5)
    assert link.calls[-1] == ("flush", None)


def test_timers_run_on_the_link_clock(link: RecordingLink) -> None:
    """call_every is due by the link's clock, which the bus steps without a broker."""
    bus = LinkBus(link.config, link)
    ticks: list[float] = []
    bus.call_every(10.0, lambda: ticks.append(link.now))
    assert bus.step() is False
    link.now = 10.0
    assert bus.step() is True
    assert ticks == [10.0]


def test_publish_refuses_an_unknown_exchange_and_another_thread_in_run(
        link: RecordingLink) -> None:
    """Both refusals are BusErrors that say what to do."""
    bus = LinkBus(link.config, link)
    with pytest.raises(BusError, match="unknown exchange"):
        bus.publish("x", StopCommand(vm_uuid="v"), exchange="nope")
    bus.publish("dead", StopCommand(vm_uuid="v"), exchange=DEAD_EXCHANGE)
    started = threading.Event()

    def loop() -> None:
        bus.call_soon_threadsafe(started.set)
        bus.run(timeout=5)

    thread = threading.Thread(target=loop)
    thread.start()
    started.wait(5)
    try:
        with pytest.raises(BusError, match="call_soon_threadsafe"):
            bus.publish("agent.g.StopCommand", StopCommand(vm_uuid="v"))
        assert bus.step() is False  # run() owns the loop
    finally:
        bus.stop()
        thread.join(5)
