"""Simulated hosts and agent.properties files for the agent's tests."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hostdev.agent.simulated import SimulatedHost, SimulatedHosts

#: A libvirt test-driver node file written by hand in libvirt's own format (not by
#: ``build_node_xml``), so parsing is checked against XML the agent did not write.
NODE_XML = Path(__file__).resolve().parents[1] / "data" / "libvirt-test-node.xml"
#: The ``test:///`` URI that opens ``NODE_XML``.
NODE_XML_URI = f"test://{NODE_XML}"

VM_OLD_UUID = "11111111-aaaa-bbbb-cccc-000000000001"
VM_IDLE_UUID = "11111111-aaaa-bbbb-cccc-000000000002"

#: pci.devices matching ``sample_spec``.
SAMPLE_DEVICES = "28:00.1|10GE,28:00.2|10GE,3b:00.0|GPU"
#: The example domain templates shipped in etc/templates (docs/templates.md).
TEMPLATES = Path(__file__).resolve().parents[2] / "etc" / "templates"
#: What the example templates name on a host: a simulated-host spec's resources.
TEMPLATE_RESOURCES: dict[str, Any] = {"networks": ["default"], "bridges": ["br0"],
                                      "pools": {"images": ["debian-12.qcow2"]}}


def example_template(name: str) -> str:
    """Returns one of etc/templates (``debian-bond.xml``, ``kernel-boot.xml``)."""
    return (TEMPLATES / name).read_text(encoding="utf-8")


def sample_spec(name: str = "sim-a", **extra: Any) -> dict[str, Any]:
    """Returns a simulated-host spec: two 10GE functions, a GPU and its audio, a bridge.

    Groups: 27 = 28:00.1 + 28:00.2 + the bridge 00:03.1 (nothing foreign);
    40 = GPU 3b:00.0 + its audio 3b:00.1 (unlisted). Domain ``vm-old`` runs
    holding 3b:00.0; ``vm-idle`` is defined and shut off.
    """
    spec: dict[str, Any] = {
        "name": name,
        "cpus": 16,
        "memory_mb": 65536,
        "devices": [
            {"address": "00:03.1", "class": "0x060400", "vendor_id": "0x1022",
             "product_id": "0x1483", "vendor": "AMD", "product": "GPP Bridge",
             "iommu_group": 27},
            {"address": "28:00.1", "iommu_group": 27, "parent": "00:03.1"},
            {"address": "28:00.2", "iommu_group": 27, "parent": "00:03.1"},
            {"address": "3b:00.0", "class": "0x030000", "vendor_id": "0x10de",
             "product_id": "0x2204", "vendor": "NVIDIA", "product": "GA102",
             "iommu_group": 40},
            {"address": "3b:00.1", "class": "0x040300", "vendor_id": "0x10de",
             "product_id": "0x1aef", "vendor": "NVIDIA", "product": "GA102 Audio",
             "iommu_group": 40},
        ],
        "domains": [
            {"name": "vm-old", "uuid": VM_OLD_UUID, "running": True,
             "hostdevs": ["3b:00.0"]},
            {"name": "vm-idle", "uuid": VM_IDLE_UUID, "running": False},
        ],
    }
    spec.update(extra)
    return spec


def write_spec(directory: Path, spec: dict[str, Any]) -> str:
    """Writes a spec as ``<name>.json`` and returns its ``simulated:///`` URI."""
    path = directory / f"{spec['name']}.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return f"simulated://{path.resolve()}"


def write_properties(directory: Path, text: str, name: str = "agent.properties") -> Path:
    """Writes an agent.properties file and returns its path."""
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


HostFactory = Callable[..., SimulatedHost]


def host_factory(directory: Path) -> Iterator[HostFactory]:
    """Yields a factory of opened simulated hosts that migrate to each other; closes them after."""
    opened: list[SimulatedHost] = []
    hosts = SimulatedHosts()

    def make(name: str = "sim-a", **extra: Any) -> SimulatedHost:
        host = SimulatedHost(write_spec(directory, sample_spec(name, **extra)), hosts=hosts)
        host.open()
        opened.append(host)
        return host

    yield make
    for host in opened:
        host.close()


class MgmtObserver:
    """Plays management with a plain pika client: reads mgmt.<guid>.# and sends commands.

    The queue is durable and named, so it keeps collecting while the broker
    closes connections; ``reconnect()`` opens a new connection to read on.
    """

    def __init__(self, url: str, guid: str) -> None:
        self.url = url
        self.guid = guid
        self.queue = f"test-observer-{guid}"
        self.seen: list[tuple[dict[str, Any], Any]] = []
        self._connect()

    def _connect(self) -> None:
        import pika

        self.connection = pika.BlockingConnection(pika.URLParameters(self.url))
        self.channel = self.connection.channel()
        self.channel.exchange_declare("hostdev.commands", "topic", durable=True)
        self.channel.queue_declare(self.queue, durable=True)
        self.channel.queue_bind(self.queue, "hostdev.commands", f"mgmt.{self.guid}.#")

    def reconnect(self) -> None:
        """Opens a fresh connection (after the broker closed the old one)."""
        with contextlib.suppress(Exception):  # already closed by the broker
            self.connection.close()
        self._connect()

    def close(self) -> None:
        """Closes the connection; the vhost's deletion removes the queue."""
        if self.connection.is_open:
            self.connection.close()

    def send(self, body: dict[str, Any]) -> str:
        """Publishes a command to the agent as management would; returns its message_id."""
        import uuid as uuid_module

        import pika

        message_id = str(uuid_module.uuid4())
        self.channel.basic_publish(
            "hostdev.commands", f"agent.{self.guid}.{body['type']}", json.dumps(body).encode(),
            pika.BasicProperties(content_type="application/json", type=body["type"],
                                 message_id=message_id, delivery_mode=2))
        return message_id

    def _drain(self) -> None:
        while True:
            method, properties, raw = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return
            self.seen.append((json.loads(raw), properties))

    def find(self, kind: str, **fields: Any) -> Callable[[], dict[str, Any] | None]:
        """Returns a condition for ``wait_for``: the first message of that type and fields."""
        def condition() -> dict[str, Any] | None:
            self._drain()
            for body, properties in self.seen:
                if body.get("type") == kind and all(
                        (properties.correlation_id if k == "correlation_id" else body.get(k)) == v
                        for k, v in fields.items()):
                    return body
            return None
        return condition

    def count(self, kind: str) -> int:
        """How many messages of that type arrived so far."""
        self._drain()
        return sum(1 for body, _ in self.seen if body.get("type") == kind)
