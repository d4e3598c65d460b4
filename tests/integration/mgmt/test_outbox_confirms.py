"""The outbox on the real RabbitMQ and MariaDB: a row is marked published once confirmed.

Nothing waits for the broker's confirms: a row is marked when its own
confirm has been read, a publish lost with its connection is republished
and then marked, and one the broker refuses for good stays unpublished for
the stale sweep.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime

import pika
import pytest
from sqlalchemy import Engine, select

from hostdev.messages.base import Message
from hostdev.messages.bus import Bus, BusConfig
from hostdev.messages.bus.contract import EVENTS_EXCHANGE, Incoming
from hostdev.messages.commands import StopCommand
from hostdev.messages.errors import BusError
from hostdev.messages.events import VmStateChanged
from hostdev.mgmt.persistence.database import create_database_engine
from hostdev.mgmt.persistence.models import OutboxEvent
from hostdev.mgmt.persistence.outbox import Outbox, OutboxPublisher, Pending
from tests.support.databases import mariadb_database
from tests.support.rabbitmq import Vhost, amqp_vhost

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mariadb]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """A migrated MariaDB database for the module."""
    with mariadb_database() as url:
        engine = create_database_engine(url)
        yield engine
        engine.dispose()


@pytest.fixture
def vhost() -> Iterator[Vhost]:
    """A fresh vhost per test (one test closes its connections)."""
    with amqp_vhost("outbox") as created:
        yield created


@pytest.fixture
def bus(vhost: Vhost) -> Iterator[Bus]:
    """Management's bus, connected; closed after the test."""
    bus = Bus(BusConfig(url=vhost.url, heartbeat=10, app_id="test-mgmt"))
    bus.connect()
    yield bus
    bus.close()


def write(engine: Engine, rows: list[tuple[str, Message]]) -> list[Pending]:
    """Commits ``rows`` to the outbox as a handler's transaction would; returns them pending."""
    with engine.begin() as connection:
        outbox = Outbox(connection)
        for routing_key, message in rows:
            outbox.add(routing_key, message)
        outbox.flush()
    return outbox.pending


def published_at(engine: Engine, rows: list[Pending]) -> list[datetime | None]:
    """Returns each row's ``published_at``, in the order of ``rows``."""
    ids = [row[0] for row in rows]
    with engine.connect() as connection:
        found = dict(connection.execute(select(OutboxEvent.id, OutboxEvent.published_at)
                                        .where(OutboxEvent.id.in_(ids))).all())
    return [found[row_id] for row_id in ids]


def marking_until(bus: Bus, publisher: OutboxPublisher, count: int,
                  timeout: float = 20.0) -> int:
    """Runs the bus loop, marking what is confirmed, until ``count`` rows are marked."""
    marked = [0]

    def done() -> bool:
        marked[0] += publisher.mark_published()
        return marked[0] >= count

    bus.run(until=done, timeout=timeout)
    return marked[0]


def stop_commands(guid: str, count: int) -> list[tuple[str, Message]]:
    return [(f"agent.{guid}.StopCommand", StopCommand(vm_uuid=str(n))) for n in range(count)]


def test_a_row_is_marked_published_when_its_confirm_arrives_later(
        engine: Engine, bus: Bus) -> None:
    """publish_now returns before any confirm; the rows are marked once the loop reads them."""
    guid = uuid.uuid4().hex[:8]
    bus.declare_agent_queue(guid)
    rows = write(engine, stop_commands(guid, 20))
    publisher = OutboxPublisher(engine, bus)

    publisher.publish_now(rows)
    # No confirm has been read yet (publishing does not read): nothing to mark, no waiting.
    assert publisher.mark_published() == 0
    assert published_at(engine, rows) == [None] * 20

    assert marking_until(bus, publisher, 20) == 20
    assert None not in published_at(engine, rows)


def test_rows_lost_with_the_connection_are_republished_then_marked(
        engine: Engine, bus: Bus, vhost: Vhost) -> None:
    """The broker drops the connection before the rows go out: they are published again
    (same message ids) on the new connection, arrive, and only then are marked."""
    guid = uuid.uuid4().hex[:8]
    queue = bus.declare_agent_queue(guid)
    rows = write(engine, stop_commands(guid, 10))
    publisher = OutboxPublisher(engine, bus)
    reconnects: list[int] = []
    bus.on_reconnect(lambda: reconnects.append(1))

    vhost.close_connections()  # the bus learns it when it next reads, after publishing
    publisher.publish_now(rows)
    assert publisher.mark_published() == 0
    assert marking_until(bus, publisher, 10) == 10
    bus.run(until=lambda: bool(reconnects), timeout=10)
    assert reconnects == [1]
    assert None not in published_at(engine, rows)

    consumer = Bus(BusConfig(url=vhost.url, heartbeat=10, app_id="test-agent"))
    consumer.connect()
    seen: list[str | None] = []

    def on_stop(_: StopCommand, incoming: Incoming) -> None:
        seen.append(incoming.message_id)

    consumer.consume(queue, {StopCommand: on_stop})
    expected = {message_id for _, message_id, _, _ in rows}
    consumer.run(until=lambda: expected <= set(seen), timeout=20)
    consumer.close()
    assert expected <= set(seen)


def test_a_row_the_broker_refuses_stays_unpublished_for_the_stale_sweep(
        engine: Engine, bus: Bus, vhost: Vhost) -> None:
    """A queue that rejects every publish makes the broker nack the row's event; after the
    bus gives it up the row is not marked, and the stale sweep publishes it once it can."""
    queue = f"test-full-{uuid.uuid4().hex[:8]}"
    params = pika.URLParameters(vhost.url)
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.queue_declare(queue, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    channel.queue_bind(queue, EVENTS_EXCHANGE, routing_key="vm.refused.#")
    vm = str(uuid.uuid4())
    rows = write(engine, [(f"vm.refused.{vm}", VmStateChanged(vm_uuid=vm, state="Running"))])
    publisher = OutboxPublisher(engine, bus, stale_after_s=0.0)

    publisher.publish_now(rows)
    with pytest.raises(BusError, match="refused 1 publish"):
        bus.wait_for_confirms(timeout=20)  # nacked, republished, nacked ... given up
    assert publisher.mark_published() == 0
    assert published_at(engine, rows) == [None]

    channel.queue_delete(queue)  # now the event is routed nowhere, and confirmed
    connection.close()
    assert publisher.publish_stale() == 1
    assert None not in published_at(engine, rows)
