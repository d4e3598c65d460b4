"""Pings in batches on the real broker, on MariaDB and SQLite: dead letters, trust, digests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pytest
from sqlalchemy import Engine, select, update

from hostdev.messages.base import Message
from hostdev.messages.bus.contract import (
    COMMANDS_EXCHANGE,
    DEAD_QUEUE,
    EVENTS_EXCHANGE,
    REASON_HEADER,
)
from hostdev.messages.codec import decode, domains_digest, encode
from hostdev.messages.commands import PingRoutingCommand, StartupRoutingCommand
from hostdev.messages.events import HostStatusChanged
from hostdev.messages.values import DomainInfo
from hostdev.mgmt.persistence.models import Host
from tests.support.broker_service import service_on_broker
from tests.support.databases import mariadb_database, sqlite_database
from tests.support.mgmt_harness import devices
from tests.support.rabbitmq import amqp_vhost
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.rabbitmq]

BOOT = "b00t"


@dataclass
class Stack:
    """A management service on the real broker, a raw AMQP channel, the database."""

    engine: Engine
    channel: Any

    def publish(self, key_guid: str, message: Message | bytes) -> None:
        """Publishes on ``mgmt.<key_guid>.<Type>`` as an agent's bus would (guest's user_id)."""
        body = message if isinstance(message, bytes) else encode(message)
        kind = "PingRoutingCommand" if isinstance(message, bytes) else type(message).__name__
        self.channel.basic_publish(COMMANDS_EXCHANGE, f"mgmt.{key_guid}.{kind}", body,
                                   pika.BasicProperties(
                                       content_type="application/json", user_id="guest",
                                       message_id=str(uuid.uuid4()), delivery_mode=2))

    def host(self, guid: str) -> Host:
        """Returns the host row as committed."""
        with self.engine.connect() as conn:
            row = conn.execute(select(Host).where(Host.guid == guid)).one()
        return Host(**row._mapping)

    def ping(self, guid: str, seq: int, domains: tuple[DomainInfo, ...] = (),
             digest: str | None = None) -> None:
        """Publishes a ping of ``guid`` (its true digest unless one is given)."""
        self.publish(guid, PingRoutingCommand(
            guid=guid, domains=domains, boot_id=BOOT, seq=seq,
            domains_digest=domains_digest(domains) if digest is None else digest))

    def seq_reaches(self, guid: str, seq: int) -> bool:
        """Tells whether the host's last applied report is ``seq``."""
        return self.host(guid).report_seq == seq


@pytest.fixture(params=[pytest.param("mariadb", marks=pytest.mark.mariadb), "sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated database: MariaDB or an SQLite file."""
    if request.param == "mariadb":
        with mariadb_database("hostdev_pings") as url:
            yield url
    else:
        with sqlite_database(tmp_path) as url:
            yield url


@pytest.fixture
def stack(db_url: str) -> Iterator[Stack]:
    """Runs a service; registers hosts ga and gb; yields the stack."""
    with amqp_vhost("pings") as vhost, service_on_broker(db_url, vhost.url) as running:
        stack = Stack(*running)
        answers = stack.channel.queue_declare("", exclusive=True).method.queue
        stack.channel.queue_bind(answers, COMMANDS_EXCHANGE, "agent.#")  # the agents' queues
        for guid in ("ga", "gb"):
            stack.publish(guid, StartupRoutingCommand(
                guid=guid, name=f"host-{guid}", cpus=16, memory_mb=32768,
                pci_devices=devices(2), boot_id=BOOT, seq=1))
        for guid in ("ga", "gb"):
            wait_for(lambda guid=guid: stack.seq_reaches(guid, 1), timeout=20,
                     what=f"host {guid} registered")
        yield stack


def _dead_letters(channel: Any, count: int) -> list[tuple[bytes, str]]:
    """Waits for ``count`` dead letters; returns their bodies and reasons."""
    got: list[tuple[bytes, str]] = []

    def take() -> bool:
        method, props, body = channel.basic_get(DEAD_QUEUE, auto_ack=True)
        if method is not None:
            got.append((body, str(props.headers[REASON_HEADER])))
        return len(got) >= count
    wait_for(take, timeout=20, what=f"{count} dead letters")
    return got


def test_a_malformed_and_a_forged_ping_are_dead_lettered_and_cost_no_other(
        stack: Stack) -> None:
    """In one burst, garbage and a ping forged for another host are dead-lettered; others apply."""
    stack.ping("ga", 10)
    stack.publish("ga", b'{"type": "PingRoutingCommand", "v": 1, "guid": 7}')
    stack.ping("gb", 10)
    stack.publish("ga", PingRoutingCommand(guid="gb", boot_id=BOOT, seq=11))  # forged for gb
    stack.ping("ga", 12)

    reasons = sorted(reason for _, reason in _dead_letters(stack.channel, 2))
    assert "guid" in reasons[1] and "undecodable" in reasons[1]
    assert "speaks for host gb" in reasons[0]
    wait_for(lambda: stack.seq_reaches("ga", 12), what="ga's pings applied")
    wait_for(lambda: stack.seq_reaches("gb", 10), what="gb's own ping applied")
    assert stack.host("gb").report_seq == 10, "the forged ping changed gb"


def test_an_unchanged_digest_skips_reconciling_and_a_new_one_reconciles(stack: Stack) -> None:
    """A ping whose digest did not change is not reconciled; one whose digest changed is."""
    one = (DomainInfo(uuid=str(uuid.uuid4()), name="stray-1", state="running"),)
    two = (*one, DomainInfo(uuid=str(uuid.uuid4()), name="stray-2", state="running"))
    stack.ping("ga", 2, one)  # the first ping of a host is reconciled: one foreign domain
    wait_for(lambda: stack.host("ga").foreign_domains == 1, what="first ping reconciled")
    assert stack.host("ga").reconciled_digest is not None

    stack.ping("ga", 3, two, digest=domains_digest(one))  # claims nothing changed
    wait_for(lambda: stack.seq_reaches("ga", 3), what="ping 3 taken")
    assert stack.host("ga").foreign_domains == 1, "an unchanged digest was reconciled"

    stack.ping("ga", 4, two)  # the true digest: changed
    wait_for(lambda: stack.host("ga").foreign_domains == 2, what="ping 4 reconciled")
    assert stack.seq_reaches("ga", 4)


def test_a_ping_of_a_down_host_brings_it_up(stack: Stack) -> None:
    """A Down host's ping makes it Up again and publishes HostStatusChanged, batched or not."""
    stack.ping("gb", 2)
    wait_for(lambda: stack.host("gb").reconciled_digest is not None, what="gb reconciled")
    events = stack.channel.queue_declare("", exclusive=True).method.queue
    stack.channel.queue_bind(events, EVENTS_EXCHANGE, "host.gb.*")
    with stack.engine.begin() as conn:
        conn.execute(update(Host).where(Host.guid == "gb").values(status="Down"))

    stack.ping("gb", 3)
    stack.ping("ga", 2)  # in the same run
    wait_for(lambda: stack.host("gb").status == "Up", what="gb Up again")

    def event() -> HostStatusChanged | None:
        method, _props, body = stack.channel.basic_get(events, auto_ack=True)
        return decode(body) if method is not None else None  # type: ignore[return-value]
    changed = wait_for(event, what="host.gb.Up")
    assert (changed.status, changed.previous) == ("Up", "Down")
    wait_for(lambda: stack.seq_reaches("ga", 2), what="ga's ping applied")
