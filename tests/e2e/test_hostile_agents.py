"""A compromised host against the real deployment: every impersonation path is refused.

One stack serves the module: ``hostdev-mgmt run`` and a victim host (a
``hostdev-agent`` process on a simulated host, connected as its own broker
user) running ``victim-vm`` (deployed through the API, two devices
allocated) and holding ``parked`` (deployed, then stopped). The attacker is
another host whose agent is compromised: it connects with pika as ITS OWN
broker user (``hostdev-mgmt rabbitmq-user add --apply``), has registered and
runs ``attacker-vm``, so it has seen real command ids of its own.

Each path is either refused by the broker (the channel is closed with 403
ACCESS_REFUSED or 406 PRECONDITION_FAILED) or dead-lettered by management
with a reason naming the hosts; a takeover report is recorded as foreign
domains of the attacker. After each, the whole rows of
``op_host_pci_devices``, ``vm_instances`` and ``jobs`` read back unchanged.
The last test stops ``victim-vm`` through the API while forged answers race
the real one: the stop still works.
"""

from __future__ import annotations

import secrets
import uuid as uuid_module
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
import pytest

from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.bus import BusConfig
from hostdev.messages.bus.amqp_message import queue_arguments
from hostdev.messages.bus.contract import (
    COMMANDS_EXCHANGE,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    EVENTS_EXCHANGE,
    MGMT_QUEUE,
    REASON_HEADER,
)
from hostdev.messages.codec import decode, encode
from hostdev.messages.commands import (
    PingRoutingCommand,
    StartAnswer,
    StartCommand,
    StartupAnswer,
    StartupRoutingCommand,
    StopAnswer,
    StopCommand,
    VmStateReport,
)
from hostdev.messages.values import DomainInfo
from tests.e2e.conftest import StackFactory
from tests.support.e2e_stack import SimHost, Stack
from tests.support.mgmt_harness import devices
from tests.support.rabbitmq import rabbitmqctl
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mariadb, pytest.mark.libvirt, pytest.mark.slow]

#: The tables no forgery may change, read back whole.
TABLES = ("op_host_pci_devices", "vm_instances", "jobs")
#: The final test pauses the victim's agent: hosts must not go Down meanwhile.
PATIENT_HOSTS = {"host.disconnected.timeout": "60s", "host.down.timeout": "120s"}


class Attacker:
    """A compromised host: pika on its own broker user, publishing what it likes."""

    def __init__(self, url: str, guid: str) -> None:
        self.guid = guid
        self.user = f"agent-{guid}"
        self.queue = f"hostdev.agent.{guid}"
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.own = self.connection.channel()
        # Its own queue, as its agent declares it (the rights allow just this one);
        # the user's recipe created it with the default bus's arguments.
        self.own.queue_declare(self.queue, durable=True,
                               arguments=queue_arguments(BusConfig()))
        self.own.queue_bind(self.queue, COMMANDS_EXCHANGE, f"agent.{guid}.#")
        self.own.confirm_delivery()

    def channel(self) -> Any:
        """A fresh channel with publisher confirms (a refusal closes the channel it hit)."""
        channel = self.connection.channel()
        channel.confirm_delivery()
        return channel

    def send(self, message: Message, *, correlation_id: str | None = None,
             user_id: str | None = "", routing_key: str | None = None,
             exchange: str = COMMANDS_EXCHANGE, channel: Any = None) -> str:
        """Publishes ``message`` (by default on its own key, as its own user); returns its id."""
        message_id = uuid_module.uuid4().hex
        props = pika.BasicProperties(
            user_id=self.user if user_id == "" else user_id, content_type="application/json",
            type=type(message).__name__, message_id=message_id,
            correlation_id=correlation_id, delivery_mode=2)
        key = routing_key or f"mgmt.{self.guid}.{type(message).__name__}"
        (channel or self.own).basic_publish(exchange, key, encode(message), props)
        return message_id

    def receive(self, kind: type[Message], correlation_id: str | None = None
                ) -> tuple[Any, str] | None:
        """Takes messages from its queue until one of ``kind`` (answering ``correlation_id``).

        Returns (the message, its id), or None when the queue is empty.
        """
        while True:
            method, props, body = self.own.basic_get(self.queue, auto_ack=True)
            if method is None:
                return None
            message = decode(body)
            if isinstance(message, kind) and correlation_id in (None, props.correlation_id):
                return message, props.message_id

    def close(self) -> None:
        """Closes its connection."""
        if self.connection.is_open:
            self.connection.close()


class DeadLetters:
    """Reads ``hostdev.dead`` as guest (an operator's view): reason by message id."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.reasons: dict[str, str] = {}

    def reason(self, message_id: str) -> str:
        """Waits until the message with this id is dead-lettered; returns its reason."""
        def arrived() -> str | None:
            while message_id not in self.reasons:
                method, props, _ = self.channel.basic_get(DEAD_QUEUE, auto_ack=True)
                if method is None:
                    return None
                reason = str((props.headers or {}).get(REASON_HEADER, ""))
                self.reasons[props.message_id or ""] = reason
            return self.reasons[message_id]
        return wait_for(arrived, timeout=20, what=f"dead letter {message_id}")

    def close(self) -> None:
        """Closes its connection."""
        if self.connection.is_open:
            self.connection.close()


@dataclass
class World:
    """The stack, the victim and its VMs, the attacker and what it has seen."""

    stack: Stack
    victim: SimHost
    attacker: Attacker
    dead: DeadLetters
    vms: dict[str, str]
    #: ids of commands: the victim's deploy (``victim``), the attacker's own (``own``)
    seen_ids: dict[str, str] = field(default_factory=dict)

    def own_domains(self) -> tuple[DomainInfo, ...]:
        """What the attacker's honest reports list: its own VM, running."""
        return (DomainInfo(uuid=self.vms["attacker-vm"], name="attacker-vm", state="running"),)

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        """The whole rows of the three guarded tables, by id."""
        return {table: self.stack.sql(f"SELECT * FROM {table} ORDER BY id") for table in TABLES}

    def barrier(self) -> None:
        """Waits until management handled everything the attacker sent before.

        One daemon handles ``hostdev.mgmt`` in order: once the answer to a
        start-up sent now arrives, every earlier message was handled.
        """
        sent = self.attacker.send(self.startup())
        wait_for(lambda: self.attacker.receive(StartupAnswer, sent), timeout=20,
                 what="the attacker's StartupAnswer")

    def startup(self, *extra: DomainInfo) -> StartupRoutingCommand:
        """The attacker's start-up: two 10GE devices, its own VM and ``extra`` domains."""
        return StartupRoutingCommand(guid=self.attacker.guid, name="attacker", cpus=16,
                                     memory_mb=65536, pci_devices=devices(2),
                                     domains=(*self.own_domains(), *extra))


@pytest.fixture(scope="module")
def world(make_e2e_stack: StackFactory) -> Iterator[World]:
    """Management, the victim (own broker user) with two VMs, the attacker with one."""
    stack = make_e2e_stack(mgmt=1, mgmt_properties=PATIENT_HOSTS, prefix="hostile")
    victim = stack.start_host("victim", {"10GE": 4}, own_user=True)
    guid = f"attacker-{secrets.token_hex(4)}"
    attacker = Attacker(stack.add_agent_user(guid), guid)
    dead = DeadLetters(stack.vhost.url)
    world = World(stack, victim, attacker, dead, vms={})
    try:
        attacker.send(StartupRoutingCommand(guid=guid, name="attacker", cpus=16,
                                            memory_mb=65536, pci_devices=devices(2)))
        stack.wait_hosts_up("victim", "attacker")
        users = rabbitmqctl("list_connections", "--silent", "vhost", "user").splitlines()
        assert f"{stack.vhost.name}\tagent-{victim.guid}" in users, users
        done = stack.cli("offering", "create", "net2", "--pci", "10GE,10GE")
        assert done.returncode == 0, done.stderr
        for name in ("victim-vm", "parked"):
            world.vms[name] = _deploy(stack, name, avoid=guid)
        job = stack.request(api.StopVmRequest(vm="parked"))
        assert isinstance(job, api.JobAccepted)
        assert stack.wait_job(job.job_id).state == "succeeded"
        # The attacker runs a VM of its own: it answers the StartCommand it gets.
        answer = stack.request(api.DeployVmRequest(name="attacker-vm", offering="net2",
                                                   avoid=(victim.guid,)))
        assert isinstance(answer, api.JobAccepted)
        world.vms["attacker-vm"] = answer.vm_uuid
        command, command_id = wait_for(lambda: attacker.receive(StartCommand), timeout=20,
                                       what="the attacker's StartCommand")
        attacker.send(StartAnswer(vm_uuid=command.vm.uuid, hostdevs=command.vm.pci_devices),
                      correlation_id=command_id)
        assert stack.wait_job(answer.job_id).state == "succeeded"
        world.seen_ids["own"] = command_id
        world.seen_ids["victim"] = stack.sql(
            "SELECT j.command_id FROM jobs j JOIN vm_instances v ON v.id = j.vm_id "
            "WHERE v.name = 'victim-vm' AND j.kind = 'deploy'")[0]["command_id"]
        yield world
    finally:
        attacker.close()
        dead.close()


def _deploy(stack: Stack, name: str, *, avoid: str) -> str:
    """Deploys ``name`` (net2) avoiding a host; waits until it runs; returns its uuid."""
    answer = stack.request(api.DeployVmRequest(name=name, offering="net2", avoid=(avoid,)))
    assert isinstance(answer, api.JobAccepted), answer
    job = stack.wait_job(answer.job_id)
    assert job.state == "succeeded", job
    return answer.vm_uuid


# -- refused by the broker ------------------------------------------------------------------

#: attempt -> (what the attacker does on a fresh channel, the broker's reply code)
BrokerAttempt = Callable[[World, Any], object]


def _publish_as_victim(w: World, ch: Any) -> object:
    return w.attacker.send(PingRoutingCommand(guid=w.victim.guid), channel=ch,
                           routing_key=f"mgmt.{w.victim.guid}.PingRoutingCommand")


def _command_to_victim(w: World, ch: Any) -> object:
    return w.attacker.send(StopCommand(vm_uuid=w.vms["victim-vm"], force=True), channel=ch,
                           routing_key=f"agent.{w.victim.guid}.StopCommand")


def _api_request(w: World, ch: Any) -> object:
    return w.attacker.send(api.StopVmRequest(vm="victim-vm"), channel=ch,
                           routing_key="api.StopVmRequest")


def _into_mgmt_queue(w: World, ch: Any) -> object:
    return w.attacker.send(PingRoutingCommand(guid=w.victim.guid), channel=ch, exchange="",
                           routing_key=MGMT_QUEUE)


def _into_victim_queue(w: World, ch: Any) -> object:
    return w.attacker.send(StopCommand(vm_uuid=w.vms["victim-vm"]), channel=ch, exchange="",
                           routing_key=f"hostdev.agent.{w.victim.guid}")


def _event(w: World, ch: Any) -> object:
    return w.attacker.send(PingRoutingCommand(guid=w.victim.guid), channel=ch,
                           exchange=EVENTS_EXCHANGE, routing_key=f"host.{w.victim.guid}.Down")


def _victim_user_id(w: World, ch: Any) -> object:
    return w.attacker.send(PingRoutingCommand(guid=w.victim.guid), channel=ch,
                           user_id=f"agent-{w.victim.guid}",
                           routing_key=f"mgmt.{w.attacker.guid}.PingRoutingCommand")


def _guest_user_id(w: World, ch: Any) -> object:
    return w.attacker.send(PingRoutingCommand(guid=w.victim.guid), channel=ch, user_id="guest")


def _victim_queue(w: World) -> str:
    return f"hostdev.agent.{w.victim.guid}"


BROKER_REFUSALS: dict[str, tuple[BrokerAttempt, int]] = {
    "publish on mgmt.<victim>.*": (_publish_as_victim, 403),
    "publish a command on agent.<victim>.*": (_command_to_victim, 403),
    "publish an API request on api.*": (_api_request, 403),
    "publish straight into hostdev.mgmt": (_into_mgmt_queue, 403),
    "publish straight into the victim's queue": (_into_victim_queue, 403),
    "publish an event": (_event, 403),
    "spoof the victim's user_id": (_victim_user_id, 406),
    "spoof management's user_id": (_guest_user_id, 406),
    "read the victim's queue": (lambda w, ch: ch.basic_get(_victim_queue(w)), 403),
    "read hostdev.mgmt": (lambda w, ch: ch.basic_get(MGMT_QUEUE), 403),
    "read hostdev.dead": (lambda w, ch: ch.basic_get(DEAD_QUEUE), 403),
    "bind its queue to the victim's commands": (lambda w, ch: ch.queue_bind(
        w.attacker.queue, COMMANDS_EXCHANGE, f"agent.{w.victim.guid}.#"), 403),
    "bind its queue to every command": (lambda w, ch: ch.queue_bind(
        w.attacker.queue, COMMANDS_EXCHANGE, "#"), 403),
    "bind its queue to the events": (lambda w, ch: ch.queue_bind(
        w.attacker.queue, EVENTS_EXCHANGE, "#"), 403),
    "bind the victim's queue to its own key": (lambda w, ch: ch.queue_bind(
        _victim_queue(w), COMMANDS_EXCHANGE, f"agent.{w.attacker.guid}.#"), 403),
    "bind hostdev.dead to the victim's commands": (lambda w, ch: ch.exchange_bind(
        DEAD_EXCHANGE, COMMANDS_EXCHANGE, f"agent.{w.victim.guid}.#"), 403),
    "declare a queue": (lambda w, ch: ch.queue_declare("evil", durable=True), 403),
    "declare a server-named queue": (lambda w, ch: ch.queue_declare("", exclusive=True), 403),
    "declare the victim's queue": (lambda w, ch: ch.queue_declare(_victim_queue(w),
                                                                  durable=True), 403),
    "delete the victim's queue": (lambda w, ch: ch.queue_delete(_victim_queue(w)), 403),
    "purge the victim's queue": (lambda w, ch: ch.queue_purge(_victim_queue(w)), 403),
    "declare an exchange": (lambda w, ch: ch.exchange_declare("evil", "fanout"), 403),
    "delete the commands exchange": (lambda w, ch: ch.exchange_delete(COMMANDS_EXCHANGE), 403),
}


@pytest.mark.parametrize("attempt", list(BROKER_REFUSALS))
def test_the_broker_refuses(world: World, attempt: str) -> None:
    """The broker closes the attacker's channel; nothing reaches anyone, no row changes."""
    action, code = BROKER_REFUSALS[attempt]
    before = world.tables()
    channel = world.attacker.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        action(world, channel)
    assert refused.value.reply_code == code, refused.value
    assert world.attacker.connection.is_open
    world.barrier()
    assert world.tables() == before


# -- dead-lettered by management ------------------------------------------------------------

#: attempt -> (the messages, with correlation ids, the attacker sends; words the reason has)
Forgery = Callable[[World], list[tuple[Message, str | None]]]


def _stop_answer(w: World) -> StopAnswer:
    return StopAnswer(vm_uuid=w.vms["victim-vm"], state="stopped")


FORGERIES: dict[str, tuple[Forgery, list[str]]] = {
    "a ping whose body names the victim": (
        lambda w: [(PingRoutingCommand(guid=w.victim.guid), None)],
        ["host {victim}", "{attacker}"]),
    "a start-up whose body names the victim (no devices)": (
        lambda w: [(StartupRoutingCommand(guid=w.victim.guid, name="victim", cpus=1,
                                          memory_mb=1), None)],
        ["host {victim}", "{attacker}"]),
    "a state report whose body names the victim": (
        lambda w: [(VmStateReport(guid=w.victim.guid, vm_uuid=w.vms["victim-vm"],
                                  state="stopped"), None)],
        ["host {victim}", "{attacker}"]),
    "answers with guessed ids": (
        lambda w: [(_stop_answer(w), guess) for guess in
                   ("outbox-1", "outbox-7", secrets.token_hex(16), str(uuid_module.uuid4()))],
        ["from host {attacker}", "no command management sent"]),
    "an answer without a correlation id": (
        lambda w: [(_stop_answer(w), None)],
        ["from host {attacker}", "carries no correlation_id"]),
    "an answer with the id of a command the victim got": (
        lambda w: [(_stop_answer(w), w.seen_ids["victim"]),
                   (StartAnswer(vm_uuid=w.vms["victim-vm"]), w.seen_ids["victim"])],
        ["from host {attacker}", "went to host {victim}"]),
    "an answer with its own command's id, for the victim's VM": (
        lambda w: [(_stop_answer(w), w.seen_ids["own"]),
                   (StartAnswer(vm_uuid=w.vms["victim-vm"]), w.seen_ids["own"])],
        ["from host {attacker}", "concerns VM {attacker-vm}"]),
}


@pytest.mark.parametrize("attempt", list(FORGERIES))
def test_management_dead_letters(world: World, attempt: str) -> None:
    """Management refuses the forgery with a reason naming the hosts; no row changes."""
    forge, words = FORGERIES[attempt]
    before = world.tables()
    sent = [world.attacker.send(message, correlation_id=correlation_id)
            for message, correlation_id in forge(world)]
    names = {"victim": world.victim.guid, "attacker": world.attacker.guid,
             "attacker-vm": world.vms["attacker-vm"]}
    for message_id in sent:
        reason = world.dead.reason(message_id)
        for word in words:
            assert word.format(**names) in reason, reason
    assert world.tables() == before


def test_a_message_without_user_id_is_dead_lettered(world: World) -> None:
    """A sender that sets no user_id is not believed, even on its own key."""
    before = world.tables()
    sent = world.attacker.send(PingRoutingCommand(guid=world.attacker.guid), user_id=None)
    assert f"host {world.attacker.guid} carries no user_id" in world.dead.reason(sent)
    assert world.tables() == before


def test_an_api_request_on_the_agents_key_is_dead_lettered(world: World) -> None:
    """An API request published on an agent's own key reaches no API handler."""
    before = world.tables()
    sent = world.attacker.send(api.StopVmRequest(vm="victim-vm"))
    assert "no handler for StopVmRequest on queue 'hostdev.mgmt'" in world.dead.reason(sent)
    assert world.tables() == before


# -- takeover reports -----------------------------------------------------------------------


def test_takeover_reports_are_recorded_as_foreign_domains(world: World) -> None:
    """Reports listing the victim's VMs as the attacker's adopt nothing; they are foreign."""
    before = world.tables()
    stolen = (DomainInfo(uuid=world.vms["victim-vm"], name="victim-vm", state="running"),
              DomainInfo(uuid=world.vms["parked"], name="parked", state="running"))
    attacker = world.attacker
    attacker.send(PingRoutingCommand(guid=attacker.guid, domains=(*world.own_domains(),
                                                                   *stolen)))
    for domain in stolen:
        for state in ("running", "stopped", "crashed"):
            attacker.send(VmStateReport(guid=attacker.guid, vm_uuid=domain.uuid,
                                        vm_name=domain.name, state=state))
    startup = attacker.send(world.startup(*stolen))
    wait_for(lambda: attacker.receive(StartupAnswer, startup), timeout=20,
             what="the answer to the takeover start-up")
    hosts = world.stack.hosts_by_name()
    assert (hosts["attacker"].foreign_domains, hosts["victim"].foreign_domains) == (2, 0)
    assert world.tables() == before
    world.barrier()  # an honest start-up again: the foreign domains are gone
    assert world.stack.hosts_by_name()["attacker"].foreign_domains == 0


# -- the victim afterwards ------------------------------------------------------------------


def test_the_victim_is_untouched_and_its_stop_works_despite_forged_answers(world: World
                                                                          ) -> None:
    """The victim's VM still runs; a stop through the API works while forgeries race it."""
    stack, victim, uuid = world.stack, world.victim, world.vms["victim-vm"]
    assert victim.domains()[uuid][1], "victim-vm no longer runs on the victim"
    assert stack.sql("SELECT state FROM vm_instances WHERE uuid = %s", uuid) == [
        {"state": "Running"}]
    victim.pause()  # the stop command waits for the agent: the attacker forges answers now
    try:
        job = stack.request(api.StopVmRequest(vm="victim-vm"))
        assert isinstance(job, api.JobAccepted)
        pending = wait_for(lambda: stack.sql(
            "SELECT command_id FROM jobs WHERE id = %s AND command_host = %s", job.job_id,
            victim.guid), timeout=20, what="the stop command")[0]["command_id"]
        before = world.tables()
        sent = [world.attacker.send(_stop_answer(world), correlation_id=guess)
                for guess in (pending, "outbox-1", secrets.token_hex(16))]
        reasons = [world.dead.reason(message_id) for message_id in sent]
        assert f"went to host {victim.guid}" in reasons[0], reasons
        assert all(f"from host {world.attacker.guid}" in r for r in reasons), reasons
        assert world.tables() == before
    finally:
        victim.resume()
    assert stack.wait_job(job.job_id).state == "succeeded"
    assert stack.sql("SELECT state FROM vm_instances WHERE uuid = %s", uuid) == [
        {"state": "Stopped"}]
    assert stack.sql("SELECT d.id FROM op_host_pci_devices d JOIN vm_instances v "
                     "ON v.id = d.instance_id WHERE v.uuid = %s", uuid) == []
    assert not victim.domains()[uuid][1]
