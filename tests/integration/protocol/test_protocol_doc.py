"""The plain-pika client of docs/protocol.md really calls the API over direct reply-to."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
import pytest

from hostdev.messages.api import HostList, ListHostsRequest
from hostdev.messages.codec import MESSAGE_TYPES, decode, encode
from hostdev.messages.values import HostRow

pytestmark = pytest.mark.rabbitmq

DOC = Path(__file__).resolve().parents[3] / "docs" / "protocol.md"
HOST = HostRow(id=1, guid="g-1", name="kvm1", status="Up", cpus=32, memory_mb=262144,
               free_devices=3, total_devices=4)


def example_code() -> str:
    """Returns the first Python block of the worked-example section of docs/protocol.md."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## 6. Worked example"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "docs/protocol.md section 6 lost its ```python example"
    return match.group(1)


def rabbitmqctl(*args: str) -> None:
    """Runs one rabbitmqctl command, failing the test with its output if it fails."""
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}"


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    """A RabbitMQ vhost of this module's own, deleted afterwards."""
    name = f"hostdev-test-protocol-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


def url(vhost: str) -> str:
    """The guest URL of ``vhost``."""
    return f"amqp://guest:guest@127.0.0.1:5672/{quote(vhost, safe='')}"


def run_example(vhost: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Runs the documented client as its own process against ``vhost``."""
    script = tmp_path / "list_hosts.py"
    script.write_text(example_code(), encoding="utf-8")
    env = {**os.environ, "HOSTDEV_AMQP_URL": url(vhost)}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=60)


class StandInManagement:
    """Answers ListHostsRequest on hostdev.api with plain pika, recording what it got."""

    def __init__(self, vhost: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url(vhost)))
        self.channel = self.connection.channel()
        self.channel.exchange_declare("hostdev.commands", "topic", durable=True)
        self.channel.queue_declare("hostdev.api", durable=True)
        self.channel.queue_bind("hostdev.api", "hostdev.commands", "api.#")
        self.received: list[tuple[Any, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.channel.basic_consume("hostdev.api", self._on_request)
        while not self.stop.is_set():
            self.connection.process_data_events(time_limit=0.1)
        self.connection.close()

    def _on_request(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        message = decode(body)
        self.received.append((properties, message))
        answer = HostList(hosts=(HOST,))
        channel.basic_publish(
            exchange="", routing_key=properties.reply_to, body=encode(answer),
            properties=pika.BasicProperties(
                content_type="application/json", type="HostList",
                correlation_id=properties.message_id, delivery_mode=2),
        )
        channel.basic_ack(method.delivery_tag)


def test_example_lists_hosts_through_direct_reply_to(vhost: str, tmp_path: Path) -> None:
    """The documented client sends a valid ListHostsRequest and prints the HostList."""
    management = StandInManagement(vhost)
    management.thread.start()
    try:
        done = run_example(vhost, tmp_path)
    finally:
        management.stop.set()
        management.thread.join(timeout=10)
    assert done.returncode == 0, done.stderr
    assert "kvm1" in done.stdout and "3/4 devices free" in done.stdout
    [(properties, message)] = management.received
    assert message == ListHostsRequest()
    assert properties.type == "ListHostsRequest" and properties.type in MESSAGE_TYPES
    assert properties.content_type == "application/json"
    assert properties.reply_to.startswith("amq.rabbitmq.reply-to.")
    assert properties.user_id == "guest" and properties.delivery_mode == 2
    assert str(uuid.UUID(properties.message_id)) == properties.message_id
    assert properties.expiration == "10000" and properties.timestamp


def test_example_says_when_nobody_serves_the_api(vhost: str, tmp_path: Path) -> None:
    """Without a hostdev.api queue the documented client exits with a clear message."""
    connection = pika.BlockingConnection(pika.URLParameters(url(vhost)))
    channel = connection.channel()
    channel.exchange_declare("hostdev.commands", "topic", durable=True)
    channel.queue_delete("hostdev.api")
    connection.close()
    done = run_example(vhost, tmp_path)
    assert done.returncode == 1
    assert "no management daemon listens on hostdev.api" in done.stderr
