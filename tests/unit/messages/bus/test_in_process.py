"""Tests of the in-process bus: the same contract as the AMQP bus, without a broker."""

from __future__ import annotations

import io
import json
import logging
import threading
from typing import Any

import pytest
import structlog

from hostdev.messages.api import HostList, ListHostsRequest, ListVmsRequest
from hostdev.messages.bus.contract import REASON_HEADER, Incoming
from hostdev.messages.bus.in_process import FakeClock, InProcessBroker, InProcessBus
from hostdev.messages.commands import ErrorAnswer, StopAnswer, StopCommand
from hostdev.messages.errors import BusError, RemoteError, RequestTimeout, TransientError
from hostdev.messages.events import HostStatusChanged
from hostdev.messages.runtime.logging import configure_logging


@pytest.fixture
def broker() -> InProcessBroker:
    return InProcessBroker(clock=FakeClock())


def _bus(broker: InProcessBroker) -> InProcessBus:
    bus = InProcessBus(broker=broker)
    bus.connect()
    return bus


def test_command_reaches_the_agent_typed_and_the_answer_goes_back_to_mgmt(
        broker: InProcessBroker) -> None:
    """A command on agent.<guid>.* is handled typed; its returned answer lands on mgmt.<guid>.*."""
    mgmt, agent = _bus(broker), _bus(broker)
    mgmt.declare_mgmt_queues()
    queue = agent.declare_agent_queue("g1")
    seen: list[tuple[StopCommand, Incoming]] = []
    answers: list[tuple[StopAnswer, Incoming]] = []

    def on_stop(msg: StopCommand, incoming: Incoming) -> StopAnswer:
        seen.append((msg, incoming))
        return StopAnswer(vm_uuid=msg.vm_uuid, state="stopped")

    agent.consume(queue, {StopCommand: on_stop})
    mgmt.consume("hostdev.mgmt", {StopAnswer: lambda m, i: answers.append((m, i))})
    mid = mgmt.send_to_agent("g1", StopCommand(vm_uuid="vm-1"))
    broker.drain()
    assert seen[0][0] == StopCommand(vm_uuid="vm-1")
    assert seen[0][1].message_id == mid and seen[0][1].routing_key == "agent.g1.StopCommand"
    assert answers[0][0].state == "stopped"
    assert answers[0][1].correlation_id == mid
    assert answers[0][1].routing_key == "mgmt.g1.StopAnswer"


def test_topic_bindings_route_with_star_and_hash(broker: InProcessBroker) -> None:
    """Bindings match AMQP topic rules: * is one word, # is zero or more."""
    bus = _bus(broker)
    bus.declare_queue("watch.hosts", ["host.*.Up"], exchange="hostdev.events")
    bus.declare_queue("watch.all", ["#"], exchange="hostdev.events")
    bus.publish_event("host.g1.Up", HostStatusChanged(host_guid="g1", status="Up"))
    bus.publish_event("host.g1.x.Up", HostStatusChanged(host_guid="g1", status="Up"))
    assert len(broker.pending("watch.hosts")) == 1
    assert len(broker.pending("watch.all")) == 2


@pytest.mark.parametrize(("body", "reason"), [
    (b"{not json", "undecodable"),
    (b'{"type": "NoSuchCommand", "v": 1}', "unknown message type"),
])
def test_undecodable_and_unknown_messages_are_dead_lettered_and_the_consumer_goes_on(
        broker: InProcessBroker, body: bytes, reason: str) -> None:
    """Malformed JSON and unknown types land in hostdev.dead with the reason; later ones flow."""
    from hostdev.messages.bus.in_process_broker import Envelope

    agent = _bus(broker)
    queue = agent.declare_agent_queue("g1")
    handled: list[StopCommand] = []
    agent.consume(queue, {StopCommand: lambda m, i: handled.append(m)})
    broker.route(Envelope("hostdev.commands", "agent.g1.Raw", body, {}), mandatory=True)
    agent.send_to_agent("g1", StopCommand(vm_uuid="after"))
    broker.drain()
    dead = broker.dead_letters()
    assert len(dead) == 1 and reason in dead[0].reason and dead[0].queue == queue
    assert dead[0].envelope.body == body
    assert [m.vm_uuid for m in handled] == ["after"]


def test_a_raising_handler_dead_letters_and_answers_an_error(broker: InProcessBroker) -> None:
    """A handler's exception dead-letters the message and sends an ErrorAnswer to its sender."""
    mgmt, agent = _bus(broker), _bus(broker)
    mgmt.declare_mgmt_queues()
    queue = agent.declare_agent_queue("g1")
    errors: list[ErrorAnswer] = []

    def boom(msg: StopCommand, incoming: Incoming) -> None:
        raise ValueError("disk on fire")

    agent.consume(queue, {StopCommand: boom})
    mgmt.consume("hostdev.mgmt", {ErrorAnswer: lambda m, i: errors.append(m)})
    mgmt.send_to_agent("g1", StopCommand(vm_uuid="vm-1"))
    broker.drain()
    dead = broker.dead_letters()
    assert "ValueError: disk on fire" in dead[0].reason
    assert dead[0].envelope.headers[REASON_HEADER] == dead[0].reason
    assert errors[0].code == "internal" and "disk on fire" in errors[0].details


def test_a_message_without_handler_is_dead_lettered(broker: InProcessBroker) -> None:
    """A decodable message of a type nobody handles on that queue is dead-lettered."""
    agent = _bus(broker)
    queue = agent.declare_agent_queue("g1")
    agent.consume(queue, {})
    agent.send_to_agent("g1", StopCommand(vm_uuid="vm-1"))
    broker.drain()
    assert "no handler for StopCommand" in broker.dead_letters()[0].reason


def test_transient_errors_are_retried_until_the_delivery_limit(broker: InProcessBroker) -> None:
    """TransientError requeues; after delivery_limit deliveries the message is dead-lettered."""
    agent = _bus(broker)
    queue = agent.declare_agent_queue("g1")
    deliveries: list[bool] = []

    def flaky(msg: StopCommand, incoming: Incoming) -> None:
        deliveries.append(incoming.redelivered)
        raise TransientError("database restarting")

    agent.consume(queue, {StopCommand: flaky})
    agent.send_to_agent("g1", StopCommand(vm_uuid="vm-1"))
    broker.drain()
    assert deliveries == [False, True, True, True, True]  # delivery_limit = 5
    assert "each of 5 deliveries" in broker.dead_letters()[0].reason


def test_transient_error_then_success_is_handled_once(broker: InProcessBroker) -> None:
    """A message that fails transiently once is redelivered and then acked, not dead-lettered."""
    agent = _bus(broker)
    queue = agent.declare_agent_queue("g1")
    calls: list[int] = []

    def once_flaky(msg: StopCommand, incoming: Incoming) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise TransientError("retry me")

    agent.consume(queue, {StopCommand: once_flaky})
    agent.send_to_agent("g1", StopCommand(vm_uuid="vm-1"))
    broker.drain()
    assert len(calls) == 2 and broker.dead_letters() == [] and broker.pending(queue) == []


def test_unroutable_command_is_dead_lettered_not_dropped(broker: InProcessBroker) -> None:
    """A command to an agent whose queue does not exist goes to hostdev.dead."""
    mgmt = _bus(broker)
    mgmt.send_to_agent("ghost", StopCommand(vm_uuid="vm-1"))
    assert "unroutable" in broker.dead_letters()[0].reason


def test_request_returns_the_typed_answer(broker: InProcessBroker) -> None:
    """request() drives passive buses and returns the handler's typed answer."""
    mgmt, client = _bus(broker), _bus(broker)
    mgmt.declare_mgmt_queues()
    mgmt.consume("hostdev.api", {ListHostsRequest: lambda m, i: HostList()})
    assert client.request(ListHostsRequest(), timeout=1) == HostList()


def test_request_answered_by_error_raises_remote_error(broker: InProcessBroker) -> None:
    """An ErrorAnswer (here: no handler for the request type) surfaces as RemoteError."""
    mgmt, client = _bus(broker), _bus(broker)
    mgmt.declare_mgmt_queues()
    mgmt.consume("hostdev.api", {ListHostsRequest: lambda m, i: HostList()})
    with pytest.raises(RemoteError, match="no handler for ListVmsRequest") as info:
        client.request(ListVmsRequest(), timeout=1)
    assert info.value.code == "invalid"


def test_request_nobody_serves_times_out_with_a_clear_error(broker: InProcessBroker) -> None:
    """A request on a declared queue without consumer raises RequestTimeout naming the key."""
    mgmt, client = _bus(broker), _bus(broker)
    mgmt.declare_mgmt_queues()
    with pytest.raises(RequestTimeout, match=r"ListHostsRequest .* within 0.05 s.*api\."):
        client.request(ListHostsRequest(), timeout=0.05)


def test_request_without_api_queue_fails_fast(broker: InProcessBroker) -> None:
    """A request nobody could ever receive raises BusError at once."""
    client = _bus(broker)
    with pytest.raises(BusError, match="no queue is bound"):
        client.request(ListHostsRequest(), timeout=5)


def test_call_every_follows_the_broker_clock() -> None:
    """Timers fire when the (fake) clock passes their interval, once per interval."""
    clock = FakeClock()
    broker = InProcessBroker(clock=clock)
    bus = _bus(broker)
    ticks: list[float] = []
    bus.call_every(10, lambda: ticks.append(clock()))
    broker.drain()
    assert ticks == []
    clock.advance(10)
    broker.drain()
    clock.advance(25)
    broker.drain()
    assert len(ticks) == 2


def test_run_in_threads_with_call_soon_threadsafe_and_stop(broker: InProcessBroker) -> None:
    """run() in a thread serves messages; call_soon_threadsafe runs in it; stop() ends it."""
    mgmt, agent = _bus(broker), _bus(broker)
    queue = agent.declare_agent_queue("g1")
    handled = threading.Event()
    loop_threads: list[int] = []
    agent.consume(queue, {StopCommand: lambda m, i: handled.set()})
    thread = threading.Thread(target=agent.run)
    thread.start()
    try:
        mgmt.send_to_agent("g1", StopCommand(vm_uuid="vm-1"))
        assert handled.wait(5)
        ran = threading.Event()
        agent.call_soon_threadsafe(lambda: (loop_threads.append(threading.get_ident()),
                                            ran.set()))
        assert ran.wait(5)
        assert loop_threads == [thread.ident]
    finally:
        agent.stop()
        thread.join(5)
    assert not thread.is_alive()


def test_run_returns_when_until_holds(broker: InProcessBroker) -> None:
    """run(until=...) returns as soon as the condition is true."""
    bus = _bus(broker)
    queue = bus.declare_agent_queue("g1")
    got: list[StopCommand] = []
    bus.consume(queue, {StopCommand: lambda m, i: got.append(m)})
    for n in range(3):
        bus.send_to_agent("g1", StopCommand(vm_uuid=f"vm-{n}"))
    bus.run(until=lambda: len(got) == 3, timeout=5)
    assert len(got) == 3


def test_reconnect_runs_the_on_reconnect_callbacks(broker: InProcessBroker) -> None:
    """A simulated reconnect runs every on_reconnect callback in the loop."""
    bus = _bus(broker)
    calls: list[str] = []
    bus.on_reconnect(lambda: calls.append("resend StartupRoutingCommand"))
    broker.disconnect_all()
    broker.drain()
    assert calls == ["resend StartupRoutingCommand"]


def test_competing_consumers_share_one_queue(broker: InProcessBroker) -> None:
    """Two mgmt buses on hostdev.mgmt each get part of the messages, none twice."""
    one, two, agent = _bus(broker), _bus(broker), _bus(broker)
    one.declare_mgmt_queues()
    got: dict[str, list[str]] = {"one": [], "two": []}
    one.consume("hostdev.mgmt", {StopAnswer: lambda m, i: got["one"].append(m.vm_uuid)})
    two.consume("hostdev.mgmt", {StopAnswer: lambda m, i: got["two"].append(m.vm_uuid)})
    for n in range(10):
        agent.send_to_mgmt("g1", StopAnswer(vm_uuid=str(n)))
    broker.drain()
    assert sorted(got["one"] + got["two"], key=int) == [str(n) for n in range(10)]
    assert got["one"] and got["two"]


def test_publish_before_connect_is_refused() -> None:
    """Using a bus before connect() raises BusError saying so."""
    with pytest.raises(BusError, match="connect"):
        InProcessBus().publish("agent.g.StopCommand", StopCommand(vm_uuid="x"))


def _logged_while_handling(broker: InProcessBroker, level: str) -> tuple[list[dict[str, Any]],
                                                                         str, str]:
    """Handles one StopCommand (its handler logs "stopping") with logging at ``level``.

    Returns the JSON lines written, the message_id and the queue.
    """
    out = io.StringIO()
    configure_logging(level, stream=out)
    try:
        bus = _bus(broker)
        queue = bus.declare_agent_queue("g1")
        bus.consume(queue, {StopCommand: lambda m, i: structlog.get_logger().info("stopping")})
        mid = bus.send_to_agent("g1", StopCommand(vm_uuid="vm-1"), correlation_id="job-1")
        broker.drain()
    finally:
        structlog.reset_defaults()
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "_hostdev", False)]:
            root.removeHandler(handler)
    return [json.loads(raw) for raw in out.getvalue().splitlines()], mid, queue


def test_handler_log_lines_carry_message_and_correlation_ids(broker: InProcessBroker) -> None:
    """While a handler runs, its log lines carry message_id, correlation_id and queue."""
    lines, mid, queue = _logged_while_handling(broker, "info")
    line = next(line for line in lines if line["event"] == "stopping")
    assert (line["message_id"], line["correlation_id"], line["queue"]) == (mid, "job-1", queue)
    assert line["message_type"] == "StopCommand"
    assert not [line for line in lines if line["event"] == "message_handled"]


def test_message_handled_is_logged_at_debug_with_its_duration(broker: InProcessBroker) -> None:
    """At debug level each handled message logs message_handled, bound to its ids."""
    lines, mid, _queue = _logged_while_handling(broker, "debug")
    handled = next(line for line in lines if line["event"] == "message_handled")
    assert handled["level"] == "debug" and handled["message_id"] == mid
    assert handled["duration_ms"] >= 0


def test_a_dead_letter_is_marked_with_the_user_that_added_it(broker: InProcessBroker) -> None:
    """user_id and x-hostdev-dead-lettered-by name the dead-lettering bus; a forged one is gone."""
    from hostdev.messages.bus.contract import DEAD_LETTERED_BY_HEADER, BusConfig

    mgmt = InProcessBus(BusConfig(url="amqp://hostdev-mgmt:pw@h//"), broker=broker)
    mgmt.connect()
    mgmt.declare_mgmt_queues()
    mgmt.consume("hostdev.mgmt", {})
    mgmt.publish("mgmt.g1.StopCommand", StopCommand(vm_uuid="vm-1"),
                 headers={DEAD_LETTERED_BY_HEADER: "someone-else", REASON_HEADER: "forged"})
    broker.drain()
    (dead,) = [d for d in broker.dead_letters() if d.queue == "hostdev.mgmt"]
    assert dead.envelope.properties["user_id"] == "hostdev-mgmt"
    assert dead.envelope.headers[DEAD_LETTERED_BY_HEADER] == "hostdev-mgmt"
    assert "no handler" in dead.reason


def test_an_agent_user_rejects_instead_of_publishing_a_dead_letter(
        broker: InProcessBroker) -> None:
    """An agent's login leaves dead-lettering to the broker: x-death names its queue."""
    from hostdev.messages.bus.contract import BusConfig

    mgmt = _bus(broker)
    mgmt.declare_mgmt_queues()
    agent = InProcessBus(BusConfig(url="amqp://agent-g1:pw@h//"), broker=broker)
    agent.connect()
    queue = agent.declare_agent_queue("g1")
    agent.consume(queue, {})
    mgmt.send_to_agent("g1", StopCommand(vm_uuid="vm-1"))
    broker.drain()
    (dead,) = broker.dead_letters()
    assert dead.reason == ""
    assert dead.envelope.headers["x-death"][0]["queue"] == queue
    assert dead.envelope.headers["x-death"][0]["reason"] == "rejected"
