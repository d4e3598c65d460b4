"""Requests over a field's limit, sent raw through RabbitMQ to a service on MariaDB.

Each is answered with an ``ErrorAnswer`` naming the field and its limit, never
with SQL; a value the database itself refuses is answered without SQL too.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pika
import pytest
from sqlalchemy import text

from hostdev.messages import api
from hostdev.messages.bus import Bus, BusConfig
from hostdev.messages.bus.contract import COMMANDS_EXCHANGE, Incoming
from hostdev.messages.codec import decode
from hostdev.messages.commands import ErrorAnswer
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.persistence.database import create_database_engine
from hostdev.mgmt.persistence.models import ServiceOffering
from hostdev.mgmt.persistence.unit_of_work import TxContext
from hostdev.mgmt.pipeline import Route
from hostdev.mgmt.service import ManagementService
from tests.support.databases import mariadb_database
from tests.support.rabbitmq import amqp_vhost
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mariadb]

#: What SQL text in an answer would look like.
SQL_WORDS = ("INSERT", "SELECT", "[SQL", "pymysql", "sqlalchemy", "Data too long")


@dataclass
class Stack:
    """A running service, its engine, and a raw AMQP client on the same vhost."""

    service: ManagementService
    url: str
    db_url: str

    def ask(self, body: bytes, request_type: str) -> ErrorAnswer | Any:
        """Publishes a raw body to ``api.<request_type>`` and returns the decoded answer."""
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            channel = connection.channel()
            reply_to = channel.queue_declare("", exclusive=True).method.queue
            channel.basic_publish(
                exchange=COMMANDS_EXCHANGE, routing_key=f"api.{request_type}", body=body,
                properties=pika.BasicProperties(content_type="application/json",
                                                message_id=str(uuid.uuid4()),
                                                reply_to=reply_to))
            for _method, _properties, answer in channel.consume(reply_to, auto_ack=True,
                                                                inactivity_timeout=20):
                assert answer is not None, f"no answer to {request_type} within 20 s"
                return decode(answer)
        finally:
            connection.close()
        raise AssertionError("unreachable")


@pytest.fixture
def stack() -> Iterator[Stack]:
    """Runs a management service on its own vhost and MariaDB database."""
    with amqp_vhost("limits") as vhost, mariadb_database("hostdev_limits") as db_url:
        engine = create_database_engine(db_url)
        bus = Bus(BusConfig(url=vhost.url, queue_type="classic", app_id="hostdev-mgmt"))
        service = ManagementService(MgmtConfig(db_url=db_url, amqp_url=vhost.url), bus, engine,
                                    name="limits")
        thread = threading.Thread(target=service.run, daemon=True)
        thread.start()
        client = Bus(BusConfig(url=vhost.url, queue_type="classic", app_id="test-client"))
        wait_for(lambda: isinstance(client.request(api.ListHostsRequest(), timeout=2),
                                    api.HostList), timeout=20, what="management answers")
        try:
            yield Stack(service, vhost.url, db_url)
        finally:
            client.close()
            service.stop()
            thread.join(timeout=10)
            service.close()
            engine.dispose()


def _incoming() -> Incoming:
    return Incoming(message_id=str(uuid.uuid4()), correlation_id=None,
                    reply_to="amq.rabbitmq.reply-to", user_id=None,
                    routing_key="api.CreateOfferingRequest", redelivered=False,
                    queue="hostdev.api")


def _refusal(answer: Any) -> str:
    assert isinstance(answer, ErrorAnswer), answer
    assert not any(word in answer.details for word in SQL_WORDS), answer.details
    return answer.details


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"type": "CreateOfferingRequest", "name": "big", "cpus": 99999999999999999999}',
     "$.cpus: `cpus` is 99999999999999999999; at most 65536"),
    (b'{"type": "CreateOfferingRequest", "name": "' + b"n" * 300 + b'"}',
     "$.name: `name` is 300 characters long; at most 64"),
    (b'{"type": "CreateOfferingRequest", "name": "a\\u0000b"}',
     '$.name: `name` "a\\u0000b" has a character or form the field does not allow'),
    (b'{"type": "CreateOfferingRequest", "name": "it\'s"}',
     "`name` \"it's\" has a character or form the field does not allow"),
    (b'{"type": "CreateOfferingRequest", "name": "m", "memory_mb": -1}',
     "$.memory_mb: `memory_mb` is -1; at least 1"),
])
def test_offering_over_a_limit_is_answered_with_the_field(stack: Stack, body: bytes,
                                                          expected: str) -> None:
    """A create over a limit is refused at decode: the answer names field and limit, no SQL."""
    details = _refusal(stack.ask(body, "CreateOfferingRequest"))
    assert expected in details
    assert "CreateOfferingRequest" in details
    engine = create_database_engine(stack.db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM service_offerings")).scalar() == 0
    finally:
        engine.dispose()


def test_a_request_with_a_huge_field_is_refused_with_a_short_reason(stack: Stack) -> None:
    """A 1 MB host reference is refused at decode; the reason is short and names the field."""
    body = b'{"type": "ListPciDevicesRequest", "host": "' + b"g" * 1048576 + b'"}'
    details = _refusal(stack.ask(body, "ListPciDevicesRequest"))
    assert "$.host: `host` is 1048576 characters long; at most 255" in details
    assert len(details) < 1000


def test_a_value_the_database_refuses_is_answered_without_sql(stack: Stack) -> None:
    """A row the database refuses (here a duplicate offering) is answered in words, no SQL."""
    def insert_twice(tx: TxContext, request: api.CreateOfferingRequest,
                     incoming: Incoming) -> api.OfferingList:
        for _ in range(2):  # the second INSERT breaks the unique name
            tx.session.add(ServiceOffering(name=request.name, cpus=1, memory_mb=1,
                                           migration_policy="forbid"))
            tx.session.flush()
        raise AssertionError("the database took a duplicate offering name")

    handler = stack.service.api_pipeline.handler(api.CreateOfferingRequest,
                                                 Route(insert_twice))
    answer = handler(api.CreateOfferingRequest(name="twice"), _incoming())
    details = _refusal(answer)
    assert answer.code == "conflict"
    assert details.startswith("the database refused CreateOfferingRequest: ")
    assert "uq_service_offerings_name" in details


def test_a_value_too_long_for_its_column_is_answered_without_sql(stack: Stack) -> None:
    """A value over a column's size (MariaDB's strict mode refuses it) is answered in words."""
    def too_long(tx: TxContext, request: api.CreateOfferingRequest,
                 incoming: Incoming) -> api.OfferingList:
        tx.session.execute(text("INSERT INTO service_offerings "
                                "(name, cpus, memory_mb, migration_policy, created_at) "
                                "VALUES (:name, 1, 1, 'forbid', NOW())"),
                           {"name": "x" * 300})
        raise AssertionError("the database took a 300-character name")

    handler = stack.service.api_pipeline.handler(api.CreateOfferingRequest, Route(too_long))
    answer = handler(api.CreateOfferingRequest(name="long"), _incoming())
    details = _refusal(answer)
    assert answer.code == "invalid"
    assert details == ("the database refused CreateOfferingRequest: a value does not fit or "
                       "conflicts with a stored row (column or key name); nothing was changed")
