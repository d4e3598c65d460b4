"""The bus on the real RabbitMQ, in a vhost of its own: delivery, dead letters, RPC, limits."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest

from hostdev.messages.api import HostList, ListHostsRequest, ListVmsRequest
from hostdev.messages.base import Message
from hostdev.messages.bus.contract import REASON_HEADER, Incoming
from hostdev.messages.codec import encode
from hostdev.messages.commands import PingRoutingCommand, StopAnswer, StopCommand
from hostdev.messages.errors import BusError, RemoteError, RequestTimeout, TransientError
from hostdev.messages.values import DomainInfo
from tests.integration.bus.conftest import BusRunner
from tests.support.rabbitmq import Vhost
from tests.support.waiting import wait_for

pytestmark = pytest.mark.rabbitmq


class DeadLetters:
    """Reads hostdev.dead with pika (no hostdev code) and keeps everything it read."""

    def __init__(self, vhost: Vhost) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(vhost.url))
        self.channel = self.connection.channel()
        self.seen: list[tuple[Any, bytes]] = []

    def find(self, predicate: Callable[[Any, bytes], bool], what: str) -> tuple[Any, bytes]:
        """Waits until a dead letter matching ``predicate`` arrived; returns (properties, body)."""

        def look() -> tuple[Any, bytes] | None:
            while True:
                method, props, body = self.channel.basic_get("hostdev.dead", auto_ack=True)
                if method is None:
                    break
                self.seen.append((props, body))
            return next(((p, b) for p, b in self.seen if predicate(p, b)), None)

        return wait_for(look, timeout=20, what=what)

    def by_id(self, message_id: str) -> tuple[Any, bytes]:
        """Waits for the dead letter of ``message_id``."""
        return self.find(lambda p, b: p.message_id == message_id, f"dead letter {message_id}")


@pytest.fixture(scope="module")
def dead(vhost: Vhost) -> Iterator[DeadLetters]:
    reader = DeadLetters(vhost)
    yield reader
    reader.connection.close()


def _guid() -> str:
    return uuid.uuid4().hex[:8]


def test_command_sent_by_hostdev_arrives_typed_with_every_property(
        runner: BusRunner, vhost: Vhost) -> None:
    """send_to_agent delivers a typed command; the AMQP properties are all set."""
    mgmt, agent = runner.bus(), runner.bus()
    guid = _guid()
    queue = agent.declare_agent_queue(guid)
    mid = mgmt.send_to_agent(guid, StopCommand(vm_uuid="vm-1"), correlation_id="job-7")
    mgmt.wait_for_confirms()
    with pika.BlockingConnection(pika.URLParameters(vhost.url)) as conn:
        _, props, body = wait_for(lambda: _get(conn, queue), what="the raw command")
    assert json.loads(body)["type"] == "StopCommand"
    assert (props.content_type, props.type, props.message_id, props.correlation_id) == (
        "application/json", "StopCommand", mid, "job-7")
    assert (props.delivery_mode, props.app_id, props.user_id) == (2, "hostdev", "guest")
    assert abs(props.timestamp - time.time()) < 60
    mid2 = mgmt.send_to_agent(guid, StopCommand(vm_uuid="vm-2"))
    got: list[tuple[StopCommand, Incoming]] = []
    agent.consume(queue, {StopCommand: lambda m, i: got.append((m, i))})
    agent.run(until=lambda: bool(got), timeout=10)
    assert got[0][0] == StopCommand(vm_uuid="vm-2")
    assert got[0][1].message_id == mid2 and got[0][1].user_id == "guest"


def _big_ping(guid: str, letter: str, domains: int) -> PingRoutingCommand:
    """A ping as large as the field limits allow it to be: long domain names."""
    return PingRoutingCommand(guid=guid, domains=tuple(
        DomainInfo(uuid=f"{n:08d}-0000-0000-0000-000000000000", name=letter * 255,
                   state="running") for n in range(domains)))


def test_large_and_small_commands_arrive_whole_and_in_order(runner: BusRunner) -> None:
    """Bodies far larger than one socket read and a burst of small ones are all handled intact."""
    mgmt, agent = runner.bus(), runner.bus()
    guid = _guid()
    queue = agent.declare_agent_queue(guid)
    sent: list[Message] = [StopCommand(vm_uuid=f"vm-{n}") for n in range(200)]
    sent[10] = _big_ping(guid, "L", 1000)  # ~300 kB: over RabbitMQ's frame size too
    sent[150] = _big_ping(guid, "M", 170)  # ~50 kB
    assert len(encode(sent[10])) > 256_000
    for message in sent:
        mgmt.send_to_agent(guid, message)
    mgmt.wait_for_confirms()
    got: list[Message] = []
    agent.consume(queue, {StopCommand: lambda m, i: got.append(m),
                          PingRoutingCommand: lambda m, i: got.append(m)})
    agent.run(until=lambda: len(got) >= len(sent), timeout=30)
    assert got == sent


def _get(conn: pika.BlockingConnection, queue: str) -> tuple[Any, Any, bytes] | None:
    method, props, body = conn.channel().basic_get(queue, auto_ack=True)
    return (method, props, body) if method else None


def test_raw_json_from_pika_is_handled_and_answered(runner: BusRunner, vhost: Vhost) -> None:
    """A plain pika client's JSON request (no hostdev code) gets a typed JSON answer."""
    server = runner.bus()
    server.declare_mgmt_queues()
    server.consume("hostdev.api", {ListHostsRequest: lambda m, i: HostList(details="2 hosts")})
    runner.start(server)
    answers: list[tuple[Any, bytes]] = []
    with pika.BlockingConnection(pika.URLParameters(vhost.url)) as conn:
        channel = conn.channel()
        channel.basic_consume("amq.rabbitmq.reply-to", auto_ack=True,
                              on_message_callback=lambda ch, m, p, b: answers.append((p, b)))
        channel.basic_publish(
            "hostdev.commands", "api.ListHostsRequest",
            b'{"type": "ListHostsRequest", "v": 1}',
            pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", message_id="pika-1",
                                 content_type="application/json"))
        deadline = time.monotonic() + 10
        while not answers and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.2)
    assert answers, "no answer to the pika request"
    props, body = answers[0]
    assert props.correlation_id == "pika-1" and props.type == "HostList"
    assert json.loads(body) == {"type": "HostList", "v": 1, "result": "ok",
                                "details": "2 hosts", "hosts": []}


def test_bad_messages_are_dead_lettered_with_reasons_and_the_consumer_goes_on(
        runner: BusRunner, vhost: Vhost, dead: DeadLetters) -> None:
    """Malformed JSON, an unknown type and a raising handler each land in hostdev.dead."""
    agent = runner.bus()
    guid = _guid()
    queue = agent.declare_agent_queue(guid)
    handled: list[str] = []

    def on_stop(msg: StopCommand, incoming: Incoming) -> None:
        if msg.vm_uuid == "explode":
            raise RuntimeError("libvirt said no")
        handled.append(msg.vm_uuid)

    agent.consume(queue, {StopCommand: on_stop})
    runner.start(agent)
    key = f"agent.{guid}.X"
    with pika.BlockingConnection(pika.URLParameters(vhost.url)) as conn:
        channel = conn.channel()
        for mid, body in (("bad-json", b"{oops"),
                          ("bad-type", b'{"type": "NoSuchCommand", "v": 1}'),
                          ("bad-handler", b'{"type": "StopCommand", "v": 1, '
                                          b'"vm_uuid": "explode"}'),
                          ("good", b'{"type": "StopCommand", "v": 1, "vm_uuid": "fine"}')):
            channel.basic_publish("hostdev.commands", key, body,
                                  pika.BasicProperties(message_id=f"{guid}-{mid}"))
    wait_for(lambda: handled == ["fine"], what="the good message after the bad ones")
    expectations = {"bad-json": "undecodable", "bad-type": "NoSuchCommand",
                    "bad-handler": "RuntimeError: libvirt said no"}
    for mid, reason in expectations.items():
        props, _ = dead.by_id(f"{guid}-{mid}")
        assert reason in props.headers[REASON_HEADER]
        assert props.headers["x-hostdev-queue"] == queue


def test_handler_error_reaches_the_requester_as_remote_error(runner: BusRunner) -> None:
    """A request whose handler raises comes back as RemoteError with the reason."""
    server, client = runner.bus(), runner.bus()
    server.declare_mgmt_queues()

    def failing(msg: ListVmsRequest, incoming: Incoming) -> None:
        raise ValueError("database is read-only")

    server.consume("hostdev.api", {ListVmsRequest: failing,
                                   ListHostsRequest: lambda m, i: HostList()})
    runner.start(server)
    assert client.request(ListHostsRequest(), timeout=10) == HostList()
    with pytest.raises(RemoteError, match="database is read-only"):
        client.request(ListVmsRequest(), timeout=10)


def test_request_nobody_serves_times_out_clearly(runner: BusRunner) -> None:
    """A request on a queue without consumer raises RequestTimeout naming key and queue."""
    bus = runner.bus()
    bus.declare_mgmt_queues()
    started = time.monotonic()
    with pytest.raises(RequestTimeout, match=r"ListHostsRequest .*within 0.5 s.*"
                       r"'api.ListHostsRequest'.*hostdev.api"):
        bus.request(ListHostsRequest(), timeout=0.5)
    assert time.monotonic() - started < 5


def test_unroutable_command_is_dead_lettered(runner: BusRunner, dead: DeadLetters) -> None:
    """A command to an agent queue that does not exist goes to hostdev.dead, not nowhere."""
    bus = runner.bus()
    mid = bus.send_to_agent(f"ghost-{_guid()}", StopCommand(vm_uuid="vm-1"))
    bus.wait_for_confirms()  # waits for the dead-letter copy of the returned message too
    props, _ = dead.by_id(mid)
    assert "unroutable" in props.headers[REASON_HEADER]


def test_transient_failures_stop_at_the_delivery_limit(
        runner: BusRunner, dead: DeadLetters) -> None:
    """A handler that keeps raising TransientError sees delivery_limit deliveries, then dead."""
    agent = runner.bus(delivery_limit=3)
    guid = _guid()
    queue = agent.declare_agent_queue(guid)
    deliveries: list[bool] = []

    def flaky(msg: StopCommand, incoming: Incoming) -> None:
        deliveries.append(incoming.redelivered)
        raise TransientError("database restarting")

    agent.consume(queue, {StopCommand: flaky})
    mid = agent.send_to_agent(guid, StopCommand(vm_uuid="vm-1"))
    runner.start(agent)
    props, _ = dead.by_id(mid)
    assert "each of 3 deliveries" in props.headers[REASON_HEADER]
    assert deliveries == [False, True, True]


def test_quorum_queue_dead_letters_after_the_broker_delivery_limit(
        runner: BusRunner, vhost: Vhost, dead: DeadLetters) -> None:
    """A consumer that keeps requeueing (or crashing) is stopped by the x-delivery-limit."""
    bus = runner.bus(delivery_limit=2)
    guid = _guid()
    queue = bus.declare_agent_queue(guid)
    mid = bus.send_to_agent(guid, StopCommand(vm_uuid="vm-1"))
    bus.wait_for_confirms()
    rejected = []
    with pika.BlockingConnection(pika.URLParameters(vhost.url)) as conn:
        channel = conn.channel()

        def reject_once() -> bool:
            method, _, _ = channel.basic_get(queue)
            if method is not None:
                channel.basic_reject(method.delivery_tag, requeue=True)
                rejected.append(method.delivery_tag)
            return len(rejected) >= 3

        wait_for(reject_once, what="three rejected deliveries")
    props, _ = dead.by_id(mid)
    assert props.headers["x-first-death-reason"] == "delivery_limit"


def test_stop_finishes_the_message_in_hand(runner: BusRunner, vhost: Vhost) -> None:
    """stop() during a handler lets it finish and ack; the message is not redelivered."""
    agent = runner.bus()
    guid = _guid()
    queue = agent.declare_agent_queue(guid)
    entered, release = threading.Event(), threading.Event()
    done: list[str] = []

    def slow(msg: StopCommand, incoming: Incoming) -> None:
        entered.set()
        assert release.wait(10)
        done.append(msg.vm_uuid)

    agent.consume(queue, {StopCommand: slow})
    agent.send_to_agent(guid, StopCommand(vm_uuid="vm-1"))
    thread = runner.start(agent)
    assert entered.wait(10)
    agent.stop()
    release.set()
    thread.join(10)
    assert not thread.is_alive() and done == ["vm-1"]
    agent.close()
    assert vhost.queue_depth(queue) == 0


def test_publish_from_another_thread_is_refused_while_running(runner: BusRunner) -> None:
    """publish() from a foreign thread while run() owns the connection raises BusError."""
    bus = runner.bus()
    runner.start(bus)
    wait_for(lambda: bus._loop_thread is not None, what="the loop to start")
    with pytest.raises(BusError, match="call_soon_threadsafe"):
        bus.send_to_agent("g", StopAnswer(vm_uuid="x"))


def test_connections_negotiate_the_configured_heartbeat(runner: BusRunner, vhost: Vhost) -> None:
    """The broker sees the heartbeat from BusConfig on the bus's connection."""
    from tests.support.rabbitmq import rabbitmqctl

    runner.bus(heartbeat=7, app_id="hb-test")
    out = rabbitmqctl("list_connections", "--silent", "vhost", "timeout", "client_properties")
    mine = [line for line in out.splitlines()
            if line.startswith(vhost.name + "\t") and "hb-test" in line]
    assert mine and all(line.split("\t")[1] == "7" for line in mine)


def test_consuming_an_undeclared_queue_is_a_clear_error(runner: BusRunner) -> None:
    """consume() of a queue that does not exist raises BusError; the bus keeps working."""
    bus = runner.bus()
    with pytest.raises(BusError, match=r"does not exist.*declare it first"):
        bus.consume("hostdev.agent.never-declared", {StopCommand: lambda m, i: None})
    guid = _guid()
    queue = bus.declare_agent_queue(guid)
    got: list[StopCommand] = []
    bus.consume(queue, {StopCommand: lambda m, i: got.append(m)})
    bus.send_to_agent(guid, StopCommand(vm_uuid="vm-1"))
    bus.run(until=lambda: bool(got), timeout=10)
    assert got == [StopCommand(vm_uuid="vm-1")]


def test_forged_reply_to_cannot_wedge_the_server(
        runner: BusRunner, vhost: Vhost, dead: DeadLetters) -> None:
    """A request whose reply_to makes the broker drop our connection ends in hostdev.dead.

    RabbitMQ 3.10 closes the publishing connection (541) for a malformed
    direct reply-to address; the server reconnects, is redelivered the request,
    and after delivery_limit unsettled deliveries rejects it unanswered, without
    publishing a copy: the broker dead-letters it (``x-death``).
    """
    server, client = runner.bus(delivery_limit=2, queue_type="classic"), runner.bus()
    server.declare_queue("hostdev.api.forged", ["api.#"])
    server.consume("hostdev.api.forged", {ListHostsRequest: lambda m, i: HostList()})
    runner.start(server)
    epoch = server._link.epoch
    forged = "amq.rabbitmq.reply-to.g2dkAA1yYWJiaXRAbG9jYWxob3N0AAAAAAAAAAIAAAAAAAAAAQ==.abc"
    mid = f"forged-{_guid()}"
    with pika.BlockingConnection(pika.URLParameters(vhost.url)) as conn:
        conn.channel().basic_publish(
            "hostdev.commands", "api.ListHostsRequest", b'{"type": "ListHostsRequest", "v": 1}',
            pika.BasicProperties(reply_to=forged, message_id=mid))
    wait_for(lambda: client.request(ListHostsRequest(), timeout=2) == HostList(), timeout=40,
             what="the server to answer again")
    if server._link.epoch != epoch:  # this broker kills the connection: the guard must act
        props, _ = dead.by_id(mid)
        assert props.headers["x-death"][0]["reason"] == "rejected"
        assert REASON_HEADER not in props.headers


def test_timers_and_calls_from_other_threads_run_in_the_loop_thread(runner: BusRunner) -> None:
    """call_every and call_soon_threadsafe run on the loop thread, where publishing is allowed."""
    bus = runner.bus()
    guid = _guid()
    queue = bus.declare_agent_queue(guid)
    threads: dict[str, int] = {}
    got: list[StopCommand] = []
    bus.consume(queue, {StopCommand: lambda m, i: got.append(m)})

    def tick() -> None:
        threads["timer"] = threading.get_ident()

    bus.call_every(0.05, tick)
    loop = runner.start(bus)
    sent = threading.Event()

    def publish_from_loop() -> None:
        threads["soon"] = threading.get_ident()
        bus.send_to_agent(guid, StopCommand(vm_uuid="from-another-thread"))
        sent.set()

    bus.call_soon_threadsafe(publish_from_loop)
    assert sent.wait(10)
    wait_for(lambda: got and "timer" in threads, what="the timer and the delivery")
    assert threads == {"timer": loop.ident, "soon": loop.ident}
    assert got == [StopCommand(vm_uuid="from-another-thread")]
