"""Drives a ManagementService without a broker: a recording bus and scripted agents.

``Harness`` calls the service's real handlers with the ``Incoming`` a bus
would build, records what the service publishes (commands through the
outbox, events), and plays agents that answer those commands. Used by the
service tests on SQLite and on MariaDB.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from hostdev.messages.base import Message
from hostdev.messages.bus.contract import BusConfig, Incoming
from hostdev.messages.codec import decode, encode
from hostdev.messages.commands import (
    PingRoutingCommand,
    StartAnswer,
    StartCommand,
    StartupRoutingCommand,
    StopAnswer,
    StopCommand,
)
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DomainInfo, PciDeviceInfo
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.service import ManagementService


@dataclass(frozen=True)
class Published:
    """One message the service published."""

    exchange: str
    routing_key: str
    message: Message
    message_id: str


@dataclass
class RecordingBus:
    """The bus interface the service uses, recording instead of talking to a broker."""

    config: BusConfig = field(default_factory=BusConfig)
    published: list[Published] = field(default_factory=list)
    consumers: dict[str, Mapping[type[Message], Any]] = field(default_factory=dict)
    batches: dict[str, Mapping[type[Message], Any]] = field(default_factory=dict)
    timers: list[tuple[float, Callable[[], None]]] = field(default_factory=list)

    def connect(self) -> None:
        """Does nothing (no broker)."""

    def close(self) -> None:
        """Does nothing (no broker)."""

    def declare_mgmt_queues(self) -> None:
        """Does nothing (no broker)."""

    def consume(self, queue: str, handlers: Mapping[type[Message], Any],
                batches: Mapping[type[Message], Any] | None = None) -> None:
        """Records the handlers (and batch handlers) of a queue."""
        self.consumers[queue] = handlers
        self.batches[queue] = batches or {}

    def call_every(self, interval_s: float, fn: Callable[[], None]) -> None:
        """Records a timer (tests call ``tick``)."""
        self.timers.append((interval_s, fn))

    def publish(self, routing_key: str, message: Message, *, exchange: str = "hostdev.commands",
                correlation_id: str | None = None, message_id: str | None = None,
                reply_to: str | None = None, expiration_s: float | None = None,
                headers: dict[str, Any] | None = None,
                on_confirmed: Callable[[], None] | None = None) -> str:
        """Records a message, encoded and decoded as the wire would; confirmed at once."""
        message_id = message_id or str(uuid.uuid4())
        self.published.append(Published(exchange, routing_key, decode(encode(message)),
                                         message_id))
        if on_confirmed is not None:
            on_confirmed()
        return message_id

    def wait_for_confirms(self, timeout: float = 30.0) -> None:
        """Everything is confirmed at once."""

    def run(self, **_: Any) -> None:
        """Returns at once."""

    def stop(self) -> None:
        """Does nothing."""


_COUNTER = itertools.count(1)


def devices(count: int, name: str = "10GE", bus: int = 0x28) -> tuple[PciDeviceInfo, ...]:
    """Returns ``count`` devices named ``name`` at bus:00.N."""
    return tuple(PciDeviceInfo(address=PciAddress(f"{bus:02x}:{n // 8:02x}.{n % 8}"), name=name)
                 for n in range(count))


class Harness:
    """A service on a real database with a recording bus and scripted agents."""

    def __init__(self, engine: Engine, config: MgmtConfig | None = None) -> None:
        self.bus = RecordingBus()
        self.service = ManagementService(config or MgmtConfig(), self.bus, engine, name="test")
        self.service.start()
        self.answered: set[str] = set()
        #: domains each simulated host runs, by guid: uuid -> DomainInfo
        self.domains: dict[str, dict[str, DomainInfo]] = {}

    def incoming(self, routing_key: str, *, user_id: str | None = "guest",
                 correlation_id: str | None = None, message_id: str | None = None,
                 reply_to: str | None = None, without_id: bool = False) -> Incoming:
        """Builds the delivery facts a bus would pass (``without_id``: the sender set none)."""
        return Incoming(message_id=None if without_id else message_id or f"m-{next(_COUNTER)}",
                        correlation_id=correlation_id, reply_to=reply_to, user_id=user_id,
                        routing_key=routing_key, redelivered=False)

    def from_agent(self, guid: str, message: Message, *, correlation_id: str | None = None,
                   user_id: str | None = "guest", message_id: str | None = None
                   ) -> Message | None:
        """Delivers a message as agent ``guid`` sent it on ``mgmt.<guid>.<Type>``."""
        handler = self.bus.consumers["hostdev.mgmt"][type(message)]
        incoming = self.incoming(f"mgmt.{guid}.{type(message).__name__}", user_id=user_id,
                                 correlation_id=correlation_id, message_id=message_id)
        result: Message | None = handler(decode(encode(message)), incoming)
        return result

    def api(self, request: Message, *, message_id: str | None = None,
            without_id: bool = False) -> Message:
        """Sends an API request and returns the answer."""
        handler = self.bus.consumers["hostdev.api"][type(request)]
        answer: Message = handler(decode(encode(request)),
                                  self.incoming(f"api.{type(request).__name__}",
                                                reply_to="amq.rabbitmq.reply-to",
                                                message_id=message_id, without_id=without_id))
        return answer

    def register(self, guid: str, name: str | None = None,
                 pci: Sequence[PciDeviceInfo] = (), *, cpus: int = 32,
                 memory_mb: int = 65536, reset_on_release: bool = False) -> Message | None:
        """Announces a host with its devices and current domains."""
        self.domains.setdefault(guid, {})
        return self.from_agent(guid, StartupRoutingCommand(
            guid=guid, name=name or guid, cpus=cpus, memory_mb=memory_mb,
            pci_devices=tuple(pci), domains=tuple(self.domains[guid].values()),
            pci_reset_on_release=reset_on_release))

    def ping(self, guid: str) -> None:
        """Sends a ping with the host's domains."""
        self.from_agent(guid, PingRoutingCommand(guid=guid,
                                                 domains=tuple(self.domains[guid].values())))

    def commands(self, kind: type[Message] | None = None) -> list[Published]:
        """Returns the commands published to agents not answered yet."""
        return [p for p in self.bus.published
                if p.routing_key.startswith("agent.") and p.message_id not in self.answered
                and (kind is None or isinstance(p.message, kind))]

    def events(self, prefix: str = "") -> list[str]:
        """Returns the routing keys of the events published, in order."""
        return [p.routing_key for p in self.bus.published
                if p.exchange == "hostdev.events" and p.routing_key.startswith(prefix)]

    def answer(self, *, ok: bool = True, only: str | None = None, details: str = "") -> int:
        """Answers pending Start/Stop commands as the agents would; returns how many."""
        count = 0
        for published in self.commands():
            guid = published.routing_key.split(".")[1]
            if only is not None and guid != only:
                continue
            self.answered.add(published.message_id)
            message = published.message
            if isinstance(message, StartCommand):
                spec = message.vm
                if ok:
                    self.domains.setdefault(guid, {})[spec.uuid] = DomainInfo(
                        uuid=spec.uuid, name=spec.name, state="running",
                        hostdevs=spec.pci_devices)
                self.from_agent(guid, StartAnswer(
                    result="ok" if ok else "error", vm_uuid=spec.uuid,
                    hostdevs=spec.pci_devices if ok else (), details=details),
                    correlation_id=published.message_id)
                count += 1
            elif isinstance(message, StopCommand):
                if ok:
                    self.domains.setdefault(guid, {}).pop(message.vm_uuid, None)
                self.from_agent(guid, StopAnswer(
                    result="ok" if ok else "error", vm_uuid=message.vm_uuid,
                    state="stopped" if ok else "running", details=details),
                    correlation_id=published.message_id)
                count += 1
        return count
