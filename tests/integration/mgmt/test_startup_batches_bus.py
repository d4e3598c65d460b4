"""A burst of start-ups on the real broker and MariaDB: registered, answered, bad ones dead."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from sqlalchemy import select

from hostdev.messages.bus.contract import COMMANDS_EXCHANGE, DEAD_QUEUE, REASON_HEADER
from hostdev.messages.codec import decode, encode
from hostdev.messages.commands import StartupAnswer, StartupRoutingCommand
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import PciDeviceInfo
from hostdev.mgmt.persistence.models import Host, PciDevice
from tests.support.broker_service import service_on_broker
from tests.support.databases import mariadb_database
from tests.support.rabbitmq import amqp_vhost
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mariadb]

GOOD = [f"burst-{n}" for n in range(6)]
#: Two devices in one IOMMU group (free, the host ruled) and a withheld one (unavailable).
DEVICES = (
    PciDeviceInfo(address=PciAddress("28:00.0"), name="10GE", iommu_group=4),
    PciDeviceInfo(address=PciAddress("28:00.1"), name="10GE", iommu_group=4),
    PciDeviceInfo(address=PciAddress("41:00.0"), name="GPU", iommu_group=9,
                  withheld="IOMMU group 9 has 41:00.1, which pci.devices does not list"),
)


@pytest.fixture
def stack() -> Iterator[tuple[Any, Any]]:
    """Runs a service on MariaDB and the broker; yields (engine, a raw pika channel)."""
    with amqp_vhost("startups") as vhost, mariadb_database("hostdev_burst") as url, \
            service_on_broker(url, vhost.url) as running:
        yield running


def _publish(channel: Any, key_guid: str, body: bytes) -> None:
    channel.basic_publish(COMMANDS_EXCHANGE, f"mgmt.{key_guid}.StartupRoutingCommand", body,
                          pika.BasicProperties(content_type="application/json", user_id="guest",
                                               type="StartupRoutingCommand",
                                               message_id=str(uuid.uuid4()), delivery_mode=2))


def _startup(guid: str) -> bytes:
    return encode(StartupRoutingCommand(guid=guid, name=f"host-{guid}", cpus=32,
                                        memory_mb=65536, pci_devices=DEVICES,
                                        boot_id="b00t", seq=1))


def test_a_burst_of_new_hosts_is_registered_and_each_agent_answered(
        stack: tuple[Any, Any]) -> None:
    """Good start-ups are registered with ruled devices and answered; bad ones dead-lettered."""
    engine, channel = stack
    answers = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(answers, COMMANDS_EXCHANGE, "agent.#")  # the agents' queues
    for guid in GOOD[:3]:
        _publish(channel, guid, _startup(guid))
    _publish(channel, "burst-x", b'{"type": "StartupRoutingCommand", "v": 1, "guid": 7}')
    _publish(channel, GOOD[0], _startup("burst-forged"))  # speaks for another host
    for guid in GOOD[3:]:
        _publish(channel, guid, _startup(guid))

    got: dict[str, StartupAnswer] = {}

    def answered() -> bool:
        method, _props, body = channel.basic_get(answers, auto_ack=True)
        if method is not None:
            answer = decode(body)
            assert isinstance(answer, StartupAnswer)
            got[method.routing_key] = answer
        return len(got) >= len(GOOD)
    wait_for(answered, timeout=30, what="an answer to every good start-up")

    dead: list[str] = []

    def dead_lettered() -> bool:
        method, props, _body = channel.basic_get(DEAD_QUEUE, auto_ack=True)
        if method is not None:
            dead.append(str(props.headers[REASON_HEADER]))
        return len(dead) >= 2
    wait_for(dead_lettered, timeout=30, what="the two bad start-ups dead-lettered")

    with engine.connect() as conn:
        hosts = {guid: host_id for guid, host_id in conn.execute(select(Host.guid, Host.id))}
        states = sorted((host_id, name, state) for host_id, name, state in conn.execute(
            select(PciDevice.host_id, PciDevice.name, PciDevice.state)))
        ruled = set(conn.scalars(select(Host.guid).where(Host.device_rules.is_(True))))
    assert set(hosts) == set(GOOD)
    assert set(got) == {f"agent.{guid}.StartupAnswer" for guid in GOOD}
    assert all(got[f"agent.{guid}.StartupAnswer"].host_id == hosts[guid] for guid in GOOD)
    assert states == sorted((host_id, name, state) for host_id in hosts.values()
                            for name, state in (("10GE", "free"), ("10GE", "free"),
                                                ("GPU", "unavailable")))
    assert ruled == set(GOOD)
    reasons = sorted(dead)
    assert any("speaks for host burst-forged" in reason for reason in reasons), reasons
    assert any("undecodable" in reason and "guid" in reason for reason in reasons), reasons
