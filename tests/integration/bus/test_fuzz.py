"""Fuzzing management on the real RabbitMQ and MariaDB: one poison message never costs another.

Management runs its real pipeline (``ManagementService`` on MariaDB) while a
client publishes a seeded mix: valid pings of a registered host and valid API
requests, interleaved with malformed JSON, wrong types, unknown types, fields
of 100 KB to 1 MB and 5 MB bodies. Afterwards: the daemon's thread is alive,
its connection was never lost (``hostdev_bus_reconnects_total`` unchanged),
every valid ping was handled and every API request answered, every other
message is in ``hostdev.dead`` with a reason of at most 4 KB marked with
management's user, and a request is answered normally.

The count: ``MESSAGES`` = 10,000, drawn at random per 1,000: about 600
valid pings, 100 valid API requests, 20 API requests with a 100 KB-1 MB
field, 80 agent messages with such a field, 200 small ones that are
malformed JSON, wrong-typed or of an unknown type; and exactly 2 bodies of
5 MB. The run takes about 35 s on a two-core machine. Set
``HOSTDEV_FUZZ_MESSAGES`` to run another count.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pika
import pytest

from hostdev.messages import api
from hostdev.messages.bus import Bus, BusConfig
from hostdev.messages.bus.contract import (
    DEAD_LETTERED_BY_HEADER,
    DEAD_QUEUE,
    HEADER_LIMIT,
    REASON_HEADER,
)
from hostdev.messages.codec import decode
from hostdev.messages.commands import ErrorAnswer, StartupAnswer, StartupRoutingCommand
from hostdev.messages.runtime.metrics import BUS_RECONNECTS, MESSAGES_HANDLED
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.persistence.database import create_database_engine
from hostdev.mgmt.service import ManagementService
from tests.support.databases import mariadb_database
from tests.support.mgmt_harness import devices
from tests.support.rabbitmq import Vhost
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mariadb, pytest.mark.slow]

MESSAGES = int(os.environ.get("HOSTDEV_FUZZ_MESSAGES", "10000"))
_BIG = (100_000, 1_000_000)
_HUGE = 5_000_000


@dataclass
class Mix:
    """What the fuzzer sent, by what management must do with it."""

    pings: int = 0
    requests: int = 0
    refused_requests: int = 0
    dead: int = 0
    big: int = 0
    huge: int = 0
    published: list[tuple[str, bytes, pika.BasicProperties]] = field(default_factory=list)


def _big(rng: random.Random) -> str:
    return "x" * rng.randint(*_BIG)


def _ping(guid: str) -> bytes:
    return json.dumps({"type": "PingRoutingCommand", "v": 1, "guid": guid}).encode()


def _poison(rng: random.Random, guid: str, *, big: bool) -> tuple[str, bytes]:
    """Returns (message type, body) of one message management must refuse."""
    kind = rng.randrange(3) + (3 if big else 0)
    if kind == 0:
        return "PingRoutingCommand", rng.choice([b"{not json", b"", b"\xff\xfe", b"[1,2"])
    if kind == 1:
        return "PingRoutingCommand", json.dumps(
            {"type": "PingRoutingCommand", "v": 1, "guid": 12345}).encode()
    if kind == 2:
        return "NoSuchCommand", json.dumps({"type": "NoSuchCommand", "v": 1}).encode()
    if kind == 3:
        return "PingRoutingCommand", _ping(_big(rng))
    if kind == 4:
        return "PingRoutingCommand", json.dumps(
            {"type": "PingRoutingCommand", "v": 1, "guid": guid, "junk": _big(rng)}).encode()
    return "PingRoutingCommand", json.dumps(
        {"type": "PingRoutingCommand", "v": 1, "guid": _big(rng), "domains": [1, "x"]}
    ).encode()


def build_mix(rng: random.Random, guid: str, reply_to: str, count: int) -> Mix:
    """Draws ``count`` messages: routing key, body and properties, in publishing order."""
    mix = Mix()
    for n in range(count):
        props = {"message_id": f"fuzz-{n}", "content_type": "application/json",
                 "user_id": "guest", "delivery_mode": 2}
        draw = rng.random()
        if n % 500 == 250:  # 2 per 1,000: a 5 MB body
            key, body = f"mgmt.{guid}.PingRoutingCommand", b'{"guid":"' + b"y" * _HUGE + b'"}'
            mix.dead += 1
            mix.huge += 1
        elif draw < 0.60:
            key, body = f"mgmt.{guid}.PingRoutingCommand", _ping(guid)
            mix.pings += 1
        elif draw < 0.70:
            key, body = "api.ListHostsRequest", json.dumps(
                {"type": "ListHostsRequest", "v": 1}).encode()
            props["reply_to"] = reply_to
            mix.requests += 1
        elif draw < 0.72:  # an API request with a big field: refused, answered with an error
            key, body = "api.ListHostsRequest", json.dumps(
                {"type": "ListHostsRequest", "v": 1, "status": _big(rng)}).encode()
            props["reply_to"] = reply_to
            mix.requests += 1
            mix.refused_requests += 1
            mix.dead += 1
            mix.big += 1
        else:
            big = draw < 0.80
            name, body = _poison(rng, guid, big=big)
            key = f"mgmt.{guid}.{name}"
            mix.dead += 1
            mix.big += big
        mix.published.append((key, body, pika.BasicProperties(**props)))
    return mix


@dataclass
class Stack:
    """Management running in a thread, and a registered host's guid."""

    vhost: Vhost
    service_thread: threading.Thread
    client: Bus
    guid: str


@pytest.fixture
def stack(vhost: Vhost) -> Iterator[Stack]:
    """Management on MariaDB with one host registered (its queue catches what it is sent)."""
    with mariadb_database("hostdev_fuzz") as db_url:
        engine = create_database_engine(db_url)
        service = ManagementService(MgmtConfig(db_url=db_url, amqp_url=vhost.url),
                                    Bus(BusConfig(url=vhost.url, app_id="hostdev-mgmt")),
                                    engine, name="fuzz")
        thread = threading.Thread(target=service.run, daemon=True)
        thread.start()
        client = Bus(BusConfig(url=vhost.url, app_id="fuzz-client"))
        wait_for(lambda: isinstance(client.request(api.ListHostsRequest(), timeout=2),
                                    api.HostList), timeout=30, what="management answers")
        guid = f"f{secrets.token_hex(4)}"
        agent = Bus(BusConfig(url=vhost.url, app_id="fuzz-agent"))
        agent.connect()
        registered: list[StartupAnswer] = []
        try:
            queue = agent.declare_agent_queue(guid)
            agent.consume(queue, {StartupAnswer: lambda m, i: registered.append(m)})
            agent.send_to_mgmt(guid, StartupRoutingCommand(
                guid=guid, name=f"host-{guid}", cpus=16, memory_mb=32768,
                pci_devices=devices(1)))
            agent.run(until=lambda: bool(registered), timeout=30)
        finally:
            agent.close()
        assert registered, "the fuzzed host got no StartupAnswer"
        try:
            yield Stack(vhost, thread, client, guid)
        finally:
            client.close()
            service.stop()
            thread.join(timeout=15)
            service.close()
            engine.dispose()


def _handled(kind: str, outcome: str) -> float:
    return float(MESSAGES_HANDLED.labels(kind, outcome)._value.get())


def _depth(channel: Any, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def _until(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    wait_for(lambda: condition() or None, timeout=timeout, interval=0.2, what=what)


def test_poison_messages_cost_no_other_message_its_delivery(stack: Stack) -> None:
    """A seeded mix of valid and poison messages: all settled, none lost, no reconnect."""
    rng = random.Random(11)
    connection = pika.BlockingConnection(pika.URLParameters(stack.vhost.url))
    channel = connection.channel()
    replies = channel.queue_declare("", exclusive=True).method.queue
    mix = build_mix(rng, stack.guid, replies, MESSAGES)
    assert mix.big >= MESSAGES // 20 and mix.huge >= MESSAGES // 500
    reconnects = BUS_RECONNECTS._value.get()
    pings_before = _handled("PingRoutingCommand", "ack")
    dead_before = _depth(channel, DEAD_QUEUE)
    for key, body, props in mix.published:
        channel.basic_publish("hostdev.commands", key, body, props)

    _until(lambda: _depth(channel, replies) >= mix.requests,
           f"answers to all {mix.requests} API requests")
    _until(lambda: _depth(channel, DEAD_QUEUE) - dead_before >= mix.dead,
           f"{mix.dead} dead letters")
    _until(lambda: _handled("PingRoutingCommand", "ack") - pings_before >= mix.pings,
           f"{mix.pings} valid pings handled")

    assert stack.service_thread.is_alive(), "management's loop died"
    assert BUS_RECONNECTS._value.get() == reconnects, "a broker connection was lost"
    answers = []
    for _ in range(mix.requests):
        method, _props, body = channel.basic_get(replies, auto_ack=True)
        assert method is not None
        answers.append(decode(body))
    errors = [a for a in answers if isinstance(a, ErrorAnswer)]
    assert len(errors) == mix.refused_requests
    assert all(isinstance(a, (api.HostList, ErrorAnswer)) for a in answers)
    assert all(len(e.details.encode()) <= HEADER_LIMIT for e in errors)
    assert _depth(channel, DEAD_QUEUE) - dead_before == mix.dead
    seen = 0
    for method, props, _body in channel.consume(DEAD_QUEUE, auto_ack=True,
                                                inactivity_timeout=5):
        if method is None:
            break
        headers = props.headers or {}
        reason = str(headers.get(REASON_HEADER, ""))
        assert reason and len(reason.encode()) <= HEADER_LIMIT
        assert headers[DEAD_LETTERED_BY_HEADER] == props.user_id == "guest"
        seen += 1
        if seen == mix.dead + dead_before:
            break
    channel.cancel()
    connection.close()
    assert seen == mix.dead + dead_before
    after = stack.client.request(api.ListHostsRequest(), timeout=10)
    assert isinstance(after, api.HostList)
    assert [h.guid for h in after.hosts] == [stack.guid]


def test_a_huge_handler_error_costs_neither_the_connection_nor_other_messages(
        vhost: Vhost) -> None:
    """A 1 MB exception text: a capped reason, no reconnect, every prefetched message handled."""
    from hostdev.messages.bus import Incoming
    from hostdev.messages.commands import StopCommand

    bus = Bus(BusConfig(url=vhost.url, heartbeat=10, prefetch=50))
    bus.connect()
    handled: list[str] = []
    reconnects = BUS_RECONNECTS._value.get()

    def stop(message: StopCommand, _incoming: Incoming) -> None:
        if message.vm_uuid == "poison":
            raise RuntimeError("x" * 1_000_000)
        handled.append(message.vm_uuid)

    try:
        queue = bus.declare_agent_queue("huge-error")
        bus.consume(queue, {StopCommand: stop})
        for n in range(41):
            bus.send_to_agent("huge-error",
                              StopCommand(vm_uuid="poison" if n == 20 else f"vm-{n}"))
        bus.run(until=lambda: len(handled) == 40, timeout=30)
    finally:
        bus.close()
    assert len(handled) == 40
    assert BUS_RECONNECTS._value.get() == reconnects
    connection = pika.BlockingConnection(pika.URLParameters(vhost.url))
    try:
        channel = connection.channel()
        reasons = []
        while (got := channel.basic_get(DEAD_QUEUE, auto_ack=True))[0] is not None:
            headers = got[1].headers or {}
            if headers.get("x-hostdev-queue") == queue:
                reasons.append(str(headers[REASON_HEADER]))
    finally:
        connection.close()
    (reason,) = reasons
    assert len(reason.encode()) <= HEADER_LIMIT and "[cut:" in reason
