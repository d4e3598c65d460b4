"""A hostile agent with its own broker user, against management on the real RabbitMQ and MariaDB.

The attacker holds a real per-agent user (``hostdev-mgmt rabbitmq-user add
--apply``'s recipe) and publishes forged answers and a takeover report for a
VM of another host; the tables are read back unchanged and each refusal is
found in ``hostdev.dead`` with its reason.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pika
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.bus import Bus, BusConfig
from hostdev.messages.bus.contract import DEAD_QUEUE, REASON_HEADER
from hostdev.messages.codec import encode
from hostdev.messages.commands import (
    PingRoutingCommand,
    StartAnswer,
    StartCommand,
    StartupAnswer,
    StartupRoutingCommand,
    StopAnswer,
    StopCommand,
)
from hostdev.messages.values import DomainInfo
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.persistence.database import create_database_engine
from hostdev.mgmt.persistence.models import Job, PciDevice, VmInstance
from hostdev.mgmt.rabbitmq_users import agent_user_recipe, apply_recipe
from hostdev.mgmt.service import ManagementService
from tests.support.databases import mariadb_database
from tests.support.mgmt_harness import devices
from tests.support.rabbitmq import Vhost, amqp_vhost, rabbitmqctl
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mariadb]


class Victim:
    """An honest agent that starts VMs and never answers a stop (so one stays pending)."""

    def __init__(self, url: str, guid: str) -> None:
        self.bus = Bus(BusConfig(url=url, queue_type="classic", app_id="victim"))
        self.guid = guid
        self.accepted = threading.Event()
        self.stop_ids: list[str] = []

    def _started(self, command: StartCommand, _: Any) -> StartAnswer:
        return StartAnswer(vm_uuid=command.vm.uuid, hostdevs=command.vm.pci_devices)

    def _stop(self, _command: StopCommand, incoming: Any) -> None:
        self.stop_ids.append(incoming.message_id)

    def _answer(self, _answer: StartupAnswer, _: Any) -> None:
        self.accepted.set()

    def run(self) -> None:
        """Connects, announces and answers until stopped (on the calling thread)."""
        self.bus.connect()
        queue = self.bus.declare_agent_queue(self.guid)
        self.bus.consume(queue, {StartCommand: self._started, StopCommand: self._stop,
                                 StartupAnswer: self._answer})
        self.bus.send_to_mgmt(self.guid, StartupRoutingCommand(
            guid=self.guid, name=f"host-{self.guid}", cpus=16, memory_mb=32768,
            pci_devices=devices(2)))
        self.bus.run()


@dataclass
class Attacker:
    """A compromised host: its own broker user, publishing what it likes."""

    guid: str
    channel: Any

    def send(self, message: Message, *, correlation_id: str | None = None) -> None:
        """Publishes ``message`` on its own routing key as its own user."""
        props = pika.BasicProperties(
            user_id=f"agent-{self.guid}", content_type="application/json",
            type=type(message).__name__, message_id=secrets.token_hex(16),
            correlation_id=correlation_id, delivery_mode=2)
        self.channel.basic_publish("hostdev.commands",
                                   f"mgmt.{self.guid}.{type(message).__name__}",
                                   encode(message), props)


@dataclass
class World:
    """The running stack: a client, the database, the victim and the attacker."""

    client: Bus
    engine: Engine
    vhost: Vhost
    victim: Victim
    attacker: Attacker


@pytest.fixture
def world() -> Iterator[World]:
    """Management, a victim host and an attacker host with its own broker user."""
    with amqp_vhost("hostile") as vhost, mariadb_database("hostdev_hostile") as db_url:
        engine = create_database_engine(db_url)
        service = ManagementService(
            MgmtConfig(db_url=db_url, amqp_url=vhost.url),
            Bus(BusConfig(url=vhost.url, queue_type="classic", app_id="hostdev-mgmt")),
            engine, name="hostile")
        service_thread = threading.Thread(target=service.run, daemon=True)
        service_thread.start()
        client = Bus(BusConfig(url=vhost.url, queue_type="classic", app_id="test-client"))
        wait_for(lambda: isinstance(client.request(api.ListHostsRequest(), timeout=2),
                                    api.HostList), timeout=20, what="management answers")
        victim = Victim(vhost.url, f"v{secrets.token_hex(4)}")
        victim_thread = threading.Thread(target=victim.run, daemon=True)
        victim_thread.start()
        assert victim.accepted.wait(20), "the victim got no StartupAnswer"
        guid = f"a{secrets.token_hex(4)}"
        recipe = agent_user_recipe(guid, vhost=vhost.name)
        apply_recipe(recipe)
        connection = pika.BlockingConnection(pika.URLParameters(
            f"amqp://{recipe.user}:{quote(recipe.password, safe='')}@127.0.0.1:5672/"
            f"{quote(vhost.name, safe='')}"))
        channel = connection.channel()
        channel.confirm_delivery()
        try:
            yield World(client, engine, vhost, victim, Attacker(guid, channel))
        finally:
            connection.close()
            rabbitmqctl("delete_user", recipe.user)
            client.close()
            victim.bus.stop()
            service.stop()
            for thread in (victim_thread, service_thread):
                thread.join(timeout=10)
            victim.bus.close()
            service.close()
            engine.dispose()


def _rows(engine: Engine) -> tuple[list[Any], list[Any], list[Any]]:
    """The rows no forgery may change: devices, VMs and jobs."""
    with Session(engine) as session:
        return (
            [tuple(r) for r in session.execute(select(
                PciDevice.id, PciDevice.state, PciDevice.instance_id).order_by(PciDevice.id))],
            [tuple(r) for r in session.execute(select(
                VmInstance.uuid, VmInstance.state, VmInstance.host_id).order_by(VmInstance.id))],
            [tuple(r) for r in session.execute(select(
                Job.id, Job.state, Job.step, Job.command_id).order_by(Job.id))],
        )


def _dead_letters(vhost: Vhost, count: int) -> list[str]:
    """Takes ``count`` refusals by management from hostdev.dead (waiting for them).

    The attacker consumes nothing, so management's answer to its start-up is
    dead-lettered as unroutable too: that one is not counted.
    """
    connection = pika.BlockingConnection(pika.URLParameters(vhost.url))
    reasons: list[str] = []
    try:
        channel = connection.channel()

        def take() -> list[str] | None:
            method, properties, _ = channel.basic_get(DEAD_QUEUE, auto_ack=True)
            if method is not None:
                reason = str((properties.headers or {}).get(REASON_HEADER, ""))
                if not reason.startswith("unroutable"):
                    reasons.append(reason)
            return reasons if len(reasons) >= count else None
        wait_for(take, timeout=30, what=f"{count} dead letters")
    finally:
        connection.close()
    return reasons


def _job_state(client: Bus, job_id: int) -> str:
    answer = client.request(api.GetJobRequest(job_id=job_id), timeout=5)
    assert isinstance(answer, api.JobList)
    return answer.jobs[0].state


def test_forged_answers_and_a_takeover_report_change_nothing(world: World) -> None:
    """Guessed and observed ids, a takeover ping, a body naming the victim: all refused."""
    client, attacker = world.client, world.attacker
    attacker.send(StartupRoutingCommand(guid=attacker.guid, name="evil", cpus=1, memory_mb=1))
    client.request(api.CreateOfferingRequest(name="net2", pci_devices="10GE,10GE"))
    deploy = client.request(api.DeployVmRequest(name="vm1", offering="net2"))
    assert isinstance(deploy, api.JobAccepted)
    assert wait_for(lambda: _job_state(client, deploy.job_id) == "succeeded" or None,
                    timeout=20, what="the deploy")
    stop = client.request(api.StopVmRequest(vm="vm1"))
    assert isinstance(stop, api.JobAccepted)
    wait_for(lambda: world.victim.stop_ids or None, timeout=20, what="the stop command")
    before = _rows(world.engine)
    uuid = deploy.vm_uuid
    forged = StopAnswer(vm_uuid=uuid, state="stopped")
    for guess in ("outbox-1", "outbox-2", "outbox-3", secrets.token_hex(16)):
        attacker.send(forged, correlation_id=guess)
    observed = world.victim.stop_ids[0]  # an id the attacker could have seen
    attacker.send(forged, correlation_id=observed)
    attacker.send(PingRoutingCommand(guid=world.victim.guid, domains=()))
    attacker.send(PingRoutingCommand(guid=attacker.guid, domains=(
        DomainInfo(uuid=uuid, name="vm1", state="running"),)))
    reasons = _dead_letters(world.vhost, 6)
    assert sum("no command management sent" in r for r in reasons) == 4, reasons
    assert any(f"from host {attacker.guid}" in r and f"went to host {world.victim.guid}" in r
               for r in reasons), reasons
    assert any("an agent may only speak for itself" in r or "may not speak for host" in r
               for r in reasons), reasons
    def foreign() -> dict[str, int] | None:
        hosts = client.request(api.ListHostsRequest())
        assert isinstance(hosts, api.HostList)
        found = {h.guid: h.foreign_domains for h in hosts.hosts}
        return found if found[attacker.guid] else None
    assert wait_for(foreign, timeout=20, what="the takeover ping") == {
        world.victim.guid: 0, attacker.guid: 1}
    assert _rows(world.engine) == before
    assert _job_state(client, stop.job_id) == "running"
