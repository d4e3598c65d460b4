"""The in-process link against the link contract, without a bus on top."""

from __future__ import annotations

import pytest

from hostdev.messages.bus.contract import COMMANDS_EXCHANGE, REASON_HEADER, BusConfig
from hostdev.messages.bus.in_process_broker import FakeClock, InProcessBroker
from hostdev.messages.bus.in_process_link import InProcessLink
from hostdev.messages.bus.link import Link
from hostdev.messages.bus.wire import new_outgoing
from hostdev.messages.codec import decode
from hostdev.messages.commands import StopCommand
from hostdev.messages.errors import BusError


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def link(clock: FakeClock) -> InProcessLink:
    made = InProcessLink(BusConfig(url="memory://"), InProcessBroker(clock=clock))
    made.connect()
    made.declare("q", COMMANDS_EXCHANGE, ("agent.g1.#",))
    made.consume("q")
    return made


def _send(link: InProcessLink, vm: str, *, expiration_s: float | None = None) -> str:
    outgoing = new_outgoing(StopCommand(vm_uuid=vm), exchange=COMMANDS_EXCHANGE,
                            routing_key="agent.g1.StopCommand", app_id="t",
                            user_id=link.user_id, expiration_s=expiration_s)
    link.send(outgoing)
    return outgoing.message_id


def test_it_satisfies_the_link_protocol(link: InProcessLink) -> None:
    """InProcessLink is a Link (checked by mypy through this assignment)."""
    typed: Link = link
    assert typed.recoverable == ()


def test_deliveries_come_in_order_with_their_properties(link: InProcessLink) -> None:
    """take() returns what was sent, in order, as a first delivery; None when empty."""
    first, second = _send(link, "vm-1"), _send(link, "vm-2")
    got = [link.take(), link.take()]
    assert [d.properties["message_id"] for d in got if d] == [first, second]
    assert all(d and not d.redelivered and d.headers["x-delivery-count"] == 0 for d in got)
    assert link.take() is None


def test_a_requeued_delivery_comes_back_first_and_counted(link: InProcessLink) -> None:
    """requeue() puts it back at the head; the next delivery says it is redelivered."""
    first = _send(link, "vm-1")
    _send(link, "vm-2")
    delivery = link.take()
    assert delivery is not None
    link.requeue(delivery)
    again = link.take()
    assert again is not None and again.properties["message_id"] == first
    assert again.redelivered and again.headers["x-delivery-count"] == 1


def test_an_expired_message_is_dead_lettered_not_delivered(
        link: InProcessLink, clock: FakeClock) -> None:
    """A message whose expiration passed in the queue goes to hostdev.dead as expired."""
    _send(link, "vm-1", expiration_s=5)
    clock.advance(6)
    assert link.take() is None
    (dead,) = link.broker.dead_letters()
    assert dead.reason == "expired" and dead.queue == "q"


def test_dead_letter_keeps_the_body_and_says_why(link: InProcessLink) -> None:
    """dead_letter() copies the delivery into hostdev.dead with the reason headers."""
    _send(link, "vm-1")
    delivery = link.take()
    assert delivery is not None
    link.dead_letter(delivery, "handler raised")
    (dead,) = link.broker.dead_letters()
    assert dead.envelope.headers[REASON_HEADER] == "handler raised"
    assert dead.routing_key == "agent.g1.StopCommand"
    assert decode(dead.envelope.body) == StopCommand(vm_uuid="vm-1")


def test_use_before_connect_and_of_an_undeclared_queue_is_refused() -> None:
    """send and consume need connect(); consume needs a declared queue."""
    link = InProcessLink(BusConfig(url="memory://"), InProcessBroker())
    with pytest.raises(BusError, match="connect"):
        _send(link, "vm-1")
    link.connect()
    with pytest.raises(BusError, match="not declared"):
        link.consume("nowhere")


def test_close_stops_consuming(link: InProcessLink) -> None:
    """After close() the link's consumers are gone: messages stay in the queue."""
    link.close()
    other = InProcessLink(BusConfig(url="memory://"), link.broker)
    other.connect()
    _send(other, "vm-1")
    assert link.take() is None
    assert len(link.broker.pending("q")) == 1


def test_the_broker_drives_the_link_and_simulates_reconnects(link: InProcessLink) -> None:
    """drain() calls the driver; disconnect_all() calls the on_reconnect callbacks."""
    steps: list[str] = []
    link.driver = lambda: bool(steps.append("step")) or len(steps) < 3
    reconnects: list[str] = []
    link.on_reconnect(lambda: reconnects.append("again"))
    assert link.broker.drain() == 2
    link.broker.disconnect_all()
    assert reconnects == ["again"]

