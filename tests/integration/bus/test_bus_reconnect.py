"""Connections closed by the broker mid-stream: both sides reconnect and nothing is lost."""

from __future__ import annotations

import threading
import uuid

import pytest

from hostdev.messages.bus.contract import Incoming
from hostdev.messages.commands import StopCommand
from tests.integration.bus.conftest import BusRunner
from tests.support.rabbitmq import Vhost
from tests.support.waiting import wait_for

pytestmark = pytest.mark.rabbitmq


def test_close_all_connections_mid_stream_loses_no_confirmed_message(
        runner: BusRunner, vhost: Vhost) -> None:
    """After rabbitmqctl closes every connection, publisher and consumer reconnect; all arrive."""
    publisher, consumer = runner.bus(), runner.bus(prefetch=10)
    guid = uuid.uuid4().hex[:8]
    queue = consumer.declare_agent_queue(guid)
    received: list[str] = []
    in_hand, release = threading.Event(), threading.Event()
    reconnects = {"publisher": 0, "consumer": 0}

    def on_stop(msg: StopCommand, incoming: Incoming) -> None:
        received.append(incoming.message_id)
        if len(received) == 100:  # hold this one while the broker drops the connections
            in_hand.set()
            assert release.wait(30)

    def count(name: str) -> None:
        reconnects[name] += 1

    consumer.on_reconnect(lambda: count("consumer"))
    publisher.on_reconnect(lambda: count("publisher"))
    consumer.consume(queue, {StopCommand: on_stop})
    sent = [publisher.send_to_agent(guid, StopCommand(vm_uuid=str(n))) for n in range(500)]
    runner.start(consumer)
    assert in_hand.wait(20)
    vhost.close_connections()
    release.set()
    # Publishing on the dropped connection fails over to a new one; nothing is lost.
    sent += [publisher.send_to_agent(guid, StopCommand(vm_uuid=str(n))) for n in range(500, 1000)]
    publisher.wait_for_confirms(timeout=30)
    publisher.run(until=lambda: reconnects["publisher"] > 0, timeout=10)
    wait_for(lambda: set(sent) <= set(received), timeout=30,
             what="every confirmed message to be consumed")
    assert reconnects == {"publisher": 1, "consumer": 1}
    assert len(set(received)) == len(sent) == 1000
    assert len(received) >= 1000  # at-least-once: the one in hand comes again


def test_a_stalled_loop_loses_its_connection_to_heartbeats_and_recovers(
        runner: BusRunner) -> None:
    """With heartbeat=1 a loop blocked for 4 s is dropped by the broker, then reconnects."""
    bus = runner.bus(heartbeat=1)
    guid = uuid.uuid4().hex[:8]
    queue = bus.declare_agent_queue(guid)
    got: list[StopCommand] = []
    reconnected = threading.Event()
    bus.on_reconnect(reconnected.set)
    bus.consume(queue, {StopCommand: lambda m, i: got.append(m)})
    runner.start(bus)
    # A handler or callback that blocks the loop (the scenario under test, not a wait).
    bus.call_soon_threadsafe(lambda: threading.Event().wait(4.0))
    assert reconnected.wait(30), "the bus did not notice the missed heartbeats"
    sent = threading.Event()
    bus.call_soon_threadsafe(lambda: (bus.send_to_agent(guid, StopCommand(vm_uuid="after")),
                                      sent.set()))
    assert sent.wait(10)
    wait_for(lambda: got == [StopCommand(vm_uuid="after")], what="delivery after recovery")
