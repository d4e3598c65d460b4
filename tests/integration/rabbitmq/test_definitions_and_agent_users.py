"""The shipped RabbitMQ definitions and per-agent users, on the real broker."""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
import pika.exceptions
import pytest

from hostdev.messages.bus.contract import BusConfig, queue_arguments
from hostdev.mgmt.errors import MgmtError
from hostdev.mgmt.rabbitmq_users import agent_user_recipe, apply_recipe
from tests.support.rabbitmq import Vhost, amqp_vhost, rabbitmqctl
from tests.support.waiting import wait_for

pytestmark = pytest.mark.rabbitmq

ROOT = Path(__file__).resolve().parents[3]
DEFINITIONS = ROOT / "etc" / "rabbitmq" / "definitions.json"


@pytest.fixture()
def vhost() -> Iterator[Vhost]:
    with amqp_vhost("defs") as created:
        yield created


@pytest.fixture()
def imported(vhost: Vhost) -> Iterator[str]:
    """Imports the shipped definitions into the test vhost under a unique mgmt user name."""
    user = f"hostdev-mgmt-test-{secrets.token_hex(4)}"
    definitions = json.loads(DEFINITIONS.read_text())
    for section in ("permissions", "policies", "exchanges", "queues", "bindings"):
        for item in definitions[section]:
            item["vhost"] = vhost.name
    definitions["vhosts"] = [{"name": vhost.name}]
    for item in definitions["users"] + definitions["permissions"]:
        key = "name" if "name" in item else "user"
        item[key] = user
    # rabbitmqctl runs as the rabbitmq user: the file must be readable by it.
    folder = Path(tempfile.mkdtemp(prefix="hostdev-defs-"))
    path = folder / "definitions.json"
    path.write_text(json.dumps(definitions))
    folder.chmod(0o755)
    path.chmod(0o644)
    try:
        rabbitmqctl("import_definitions", str(path))
    finally:
        shutil.rmtree(folder)
    yield user
    rabbitmqctl("delete_user", user)


def _agent_connection(vhost: Vhost, user: str, password: str) -> pika.BlockingConnection:
    params = pika.URLParameters(
        f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:5672/"
        f"{quote(vhost.name, safe='')}")
    return pika.BlockingConnection(params)


@pytest.fixture()
def topology(vhost: Vhost) -> None:
    """Declares hostdev's exchanges and management queues as the daemon would."""
    from hostdev.messages.bus import Bus, BusConfig

    bus = Bus(BusConfig(url=vhost.url))
    bus.connect()
    try:
        bus.declare_mgmt_queues()
    finally:
        bus.close()


@pytest.fixture()
def agent_user(vhost: Vhost, topology: None) -> Iterator[tuple[str, str]]:
    guid = f"h{secrets.token_hex(4)}"
    recipe = agent_user_recipe(guid, vhost=vhost.name)
    # The agent's own queue exists before it connects (management or the
    # operator creates it with the user), so the agent needs no wide rights.
    apply_recipe(recipe)
    yield guid, recipe.password
    rabbitmqctl("delete_user", recipe.user)


def test_definitions_declare_exchanges_queues_and_policy(imported: str, vhost: Vhost) -> None:
    """Importing definitions.json creates hostdev's exchanges, quorum queues and policy."""
    exchanges = rabbitmqctl("list_exchanges", "--silent", "-p", vhost.name, "name", "type")
    assert {"hostdev.commands\ttopic", "hostdev.events\ttopic", "hostdev.dead\tfanout"} <= set(
        exchanges.splitlines())
    queues = rabbitmqctl("list_queues", "--silent", "-p", vhost.name, "name", "type")
    assert {"hostdev.mgmt\tquorum", "hostdev.api\tquorum", "hostdev.dead\tquorum"} <= set(
        queues.splitlines())
    policies = rabbitmqctl("list_policies", "--silent", "-p", vhost.name)
    assert "hostdev-dead-letter" in policies


def test_definitions_match_what_the_bus_declares(imported: str, vhost: Vhost) -> None:
    """The bus declares the imported queues again without a precondition failure."""
    from hostdev.messages.bus import Bus, BusConfig

    bus = Bus(BusConfig(url=vhost.url))
    bus.connect()
    try:
        bus.declare_mgmt_queues()
    finally:
        bus.close()


def test_agent_user_can_publish_only_as_itself(vhost: Vhost, agent_user: tuple[str, str]
                                              ) -> None:
    """An agent user publishes mgmt.<own guid>.*, but not as another host."""
    guid, password = agent_user
    user = f"agent-{guid}"
    connection = _agent_connection(vhost, user, password)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        props = pika.BasicProperties(user_id=user, content_type="application/json",
                                     type="PingRoutingCommand")
        body = json.dumps({"type": "PingRoutingCommand", "v": 1, "guid": guid}).encode()
        channel.basic_publish("hostdev.commands", f"mgmt.{guid}.PingRoutingCommand", body, props)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.basic_publish("hostdev.commands", "mgmt.otherhost.PingRoutingCommand",
                                  body, props)
        assert refused.value.reply_code == 403
    finally:
        if connection.is_open:
            connection.close()
    guest = pika.BlockingConnection(pika.URLParameters(vhost.url))
    try:
        method, properties, _body = guest.channel().basic_get("hostdev.mgmt", auto_ack=True)
        assert method is not None, "the agent's own ping did not reach hostdev.mgmt"
        assert method.routing_key == f"mgmt.{guid}.PingRoutingCommand"
        assert properties.user_id == user
    finally:
        guest.close()


def test_agent_user_cannot_claim_another_user_id(vhost: Vhost, agent_user: tuple[str, str]
                                                ) -> None:
    """The broker refuses a message whose user_id is not the agent's own login."""
    guid, password = agent_user
    connection = _agent_connection(vhost, f"agent-{guid}", password)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        props = pika.BasicProperties(user_id="agent-otherhost")
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.basic_publish("hostdev.commands", f"mgmt.{guid}.PingRoutingCommand",
                                  b"{}", props)
        assert refused.value.reply_code == 406
    finally:
        if connection.is_open:
            connection.close()


def test_agent_user_cannot_read_the_management_queue(vhost: Vhost,
                                                    agent_user: tuple[str, str]) -> None:
    """An agent user cannot consume hostdev.mgmt (it would see other hosts' traffic)."""
    guid, password = agent_user
    connection = _agent_connection(vhost, f"agent-{guid}", password)
    try:
        channel = connection.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.basic_get("hostdev.mgmt")
        assert refused.value.reply_code == 403
    finally:
        if connection.is_open:
            connection.close()


def test_agent_user_cannot_add_a_dead_letter(vhost: Vhost, agent_user: tuple[str, str]) -> None:
    """A dead letter claiming another origin is refused: the agent may not write hostdev.dead."""
    guid, password = agent_user
    user = f"agent-{guid}"
    connection = _agent_connection(vhost, user, password)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        forged = pika.BasicProperties(user_id=user, headers={
            "x-hostdev-reason": "forged", "x-hostdev-dead-lettered-by": "hostdev-mgmt",
            "x-hostdev-queue": "hostdev.mgmt"})
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.basic_publish("hostdev.dead", "", b"{}", forged)
        assert refused.value.reply_code == 403
        channel = connection.channel()
        channel.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.basic_publish("hostdev.dead", "", b"{}", pika.BasicProperties())
        assert refused.value.reply_code == 403
    finally:
        if connection.is_open:
            connection.close()
    assert vhost.queue_depth("hostdev.dead") == 0


def _dead_letters(vhost: Vhost, count: int) -> list[tuple[bytes, Any]]:
    guest = pika.BlockingConnection(pika.URLParameters(vhost.url))
    found: list[tuple[bytes, Any]] = []
    try:
        channel = guest.channel()

        def take() -> bool:
            method, properties, body = channel.basic_get("hostdev.dead", auto_ack=True)
            if method is not None:
                found.append((body, properties))
            return len(found) >= count

        wait_for(take, timeout=15, what=f"{count} dead letter(s) in hostdev.dead")
    finally:
        guest.close()
    return found


def test_agent_queue_still_dead_letters_at_its_delivery_limit(
        vhost: Vhost, agent_user: tuple[str, str]) -> None:
    """The broker dead-letters the agent's own queue (delivery limit), as the broker."""
    guid, password = agent_user
    queue = f"hostdev.agent.{guid}"
    guest = pika.BlockingConnection(pika.URLParameters(vhost.url))
    try:
        guest.channel().basic_publish("hostdev.commands", f"agent.{guid}.StopCommand", b"{}",
                                      pika.BasicProperties(message_id="poison"))
    finally:
        guest.close()
    connection = _agent_connection(vhost, f"agent-{guid}", password)
    try:
        channel = connection.channel()
        for _ in range(6):  # the recipe's delivery limit is 5
            method, _properties, _body = channel.basic_get(queue)
            if method is None:
                break
            channel.basic_nack(method.delivery_tag, requeue=True)
    finally:
        connection.close()
    ((body, properties),) = _dead_letters(vhost, 1)
    assert body == b"{}"
    death = properties.headers["x-death"][0]
    assert (death["queue"], death["reason"]) == (queue, "delivery_limit")


def test_agent_bus_rejects_what_it_cannot_handle_without_reconnecting(
        vhost: Vhost, agent_user: tuple[str, str]) -> None:
    """The agent's bus, on its own user, leaves dead-lettering to the broker and goes on."""
    from hostdev.messages.bus import Bus, BusConfig, Incoming
    from hostdev.messages.commands import StopCommand
    from hostdev.messages.runtime.metrics import BUS_RECONNECTS

    guid, password = agent_user
    url = (f"amqp://agent-{guid}:{quote(password, safe='')}@127.0.0.1:5672/"
           f"{quote(vhost.name, safe='')}")
    bus = Bus(BusConfig(url=url, heartbeat=10))
    bus.connect()
    handled: list[str] = []
    reconnects = BUS_RECONNECTS._value.get()
    try:
        queue = bus.declare_agent_queue(guid)  # exists: re-declared with the same arguments

        def stop(message: StopCommand, _incoming: Incoming) -> None:
            handled.append(message.vm_uuid)

        bus.consume(queue, {StopCommand: stop})
        guest = pika.BlockingConnection(pika.URLParameters(vhost.url))
        try:
            channel = guest.channel()
            channel.basic_publish("hostdev.commands", f"agent.{guid}.StopCommand",
                                  b"not json", pika.BasicProperties(message_id="bad"))
            channel.basic_publish("hostdev.commands", f"agent.{guid}.StopCommand",
                                  json.dumps({"type": "StopCommand", "v": 1,
                                              "vm_uuid": "vm-after"}).encode(),
                                  pika.BasicProperties(message_id="good"))
        finally:
            guest.close()
        bus.run(until=lambda: bool(handled), timeout=15)
    finally:
        bus.close()
    assert handled == ["vm-after"]
    ((body, properties),) = _dead_letters(vhost, 1)
    assert body == b"not json"
    death = properties.headers["x-death"][0]
    assert (death["queue"], death["reason"]) == (queue, "rejected")
    assert BUS_RECONNECTS._value.get() == reconnects


def test_recipe_prints_rabbitmqctl_lines() -> None:
    """The recipe reads as the rabbitmqctl commands an operator would run."""
    text = agent_user_recipe("h1", password="pw").shell()
    assert "rabbitmqctl add_user agent-h1 -- pw" in text
    assert "set_topic_permissions -p / agent-h1 hostdev.commands '^mgmt\\.h1\\.'" in text
    assert "hostdev\\.dead" not in text.split("set_permissions")[1].split("\n")[0]
    assert "rabbitmqctl import_definitions <<'EOF'" in text
    assert '"x-dead-letter-exchange": "hostdev.dead"' in text


def test_recipe_creates_the_queue_the_agent_declares_for_its_queue_type() -> None:
    """The queue the recipe creates has the arguments the agent's bus declares, either type."""
    for queue_type in ("quorum", "classic"):
        recipe = agent_user_recipe("h1", password="pw", queue_type=queue_type)
        (queue,) = json.loads(recipe.definitions())["queues"]
        assert queue["arguments"] == queue_arguments(BusConfig(queue_type=queue_type))
    with pytest.raises(MgmtError, match="queue type 'stream'"):
        agent_user_recipe("h1", queue_type="stream")


@pytest.mark.libvirt
def test_recipe_applies_a_password_that_starts_with_a_dash(vhost: Vhost, topology: None
                                                           ) -> None:
    """A password starting with "-" (one generated password in 64) is set, not refused."""
    recipe = agent_user_recipe(f"h{secrets.token_hex(4)}", vhost=vhost.name,
                               password=f"-{secrets.token_urlsafe(12)}")
    apply_recipe(recipe)
    try:
        _agent_connection(vhost, recipe.user, recipe.password).close()
    finally:
        rabbitmqctl("delete_user", recipe.user)


def test_agent_process_runs_as_its_own_broker_user(vhost: Vhost, topology: None,
                                                   tmp_path: Path) -> None:
    """hostdev-agent starts, declares its queue and announces with only its own user's rights."""
    from tests.support.agent import (
        SAMPLE_DEVICES,
        MgmtObserver,
        sample_spec,
        write_properties,
        write_spec,
    )
    from tests.support.processes import Daemon

    guid = f"h{secrets.token_hex(4)}"
    recipe = agent_user_recipe(guid, vhost=vhost.name)
    apply_recipe(recipe)
    observer = MgmtObserver(vhost.url, guid)
    url = (f"amqp://{recipe.user}:{quote(recipe.password, safe='')}@127.0.0.1:5672/"
           f"{quote(vhost.name, safe='')}")
    config = write_properties(tmp_path, (
        f"guid={guid}\nname=own-user\namqp.url={url}\nlibvirt.uri="
        f"{write_spec(tmp_path, sample_spec(f'sim-{guid}'))}\npci.devices={SAMPLE_DEVICES}\n"
        "ping.interval=1h\nlog.format=json\n"))
    daemon = Daemon(f"agent-{guid}", ["hostdev-agent", "--config", str(config)],
                    tmp_path).start()
    try:
        startup = wait_for(observer.find("StartupRoutingCommand"), timeout=30,
                           what=f"the agent's start-up announcement\n{daemon.tail()}")
        assert startup["guid"] == guid
        (_, properties), = [(b, p) for b, p in observer.seen
                            if b.get("type") == "StartupRoutingCommand"]
        assert properties.user_id == recipe.user
    finally:
        code = daemon.stop()
        observer.close()
        rabbitmqctl("delete_user", recipe.user)
    assert code == 0, daemon.tail()
