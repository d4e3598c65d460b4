"""The bus counters and the /metrics endpoint of hostdev.messages.runtime.metrics."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client import REGISTRY

from hostdev.messages.api import ListHostsRequest
from hostdev.messages.bus.contract import COMMANDS_EXCHANGE
from hostdev.messages.bus.in_process import InProcessBroker, InProcessBus
from hostdev.messages.bus.in_process_broker import Envelope
from hostdev.messages.runtime.metrics import bus_reconnected, serve_metrics


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_deliveries_are_counted_by_type_and_outcome() -> None:
    """A handled message counts as ack; an undecodable one as dead and dead-lettered."""
    broker = InProcessBroker()
    bus = InProcessBus(broker=broker)
    bus.connect()
    bus.declare_queue("hostdev.api", ["api.#"])
    bus.consume("hostdev.api", {ListHostsRequest: lambda message, incoming: None})
    acked = _count("hostdev_messages_handled_total", type="ListHostsRequest", outcome="ack")
    dead = _count("hostdev_messages_dead_lettered_total", type="undecodable")
    bus.publish("api.ListHostsRequest", ListHostsRequest())
    broker.route(_garbage(), mandatory=True)
    broker.drain()
    assert _count("hostdev_messages_handled_total", type="ListHostsRequest",
                  outcome="ack") == acked + 1
    assert _count("hostdev_messages_dead_lettered_total", type="undecodable") == dead + 1
    assert [d.reason[:20] for d in broker.dead_letters()] == ["undecodable message "]


def _garbage() -> Envelope:
    return Envelope(COMMANDS_EXCHANGE, "api.Nonsense", b"{not json", {"message_id": "m-1"})


def test_reconnects_are_counted() -> None:
    """Each re-established connection adds one to hostdev_bus_reconnects_total."""
    before = _count("hostdev_bus_reconnects_total")
    bus_reconnected()
    assert _count("hostdev_bus_reconnects_total") == before + 1


def test_endpoint_is_off_without_a_port_and_survives_a_taken_one() -> None:
    """No port serves nothing; a taken port is logged and yields None, not an exception."""
    assert serve_metrics(None) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve_metrics(taken.getsockname()[1], address="127.0.0.1") is None


def test_endpoint_serves_the_bus_counters() -> None:
    """An ephemeral-port endpoint answers /metrics with the bus counters, then closes."""
    server = serve_metrics(0, address="127.0.0.1")
    assert server is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics",
                                    timeout=10) as response:
            text = response.read().decode()
    finally:
        server.close()
    assert "# TYPE hostdev_bus_reconnects_total counter" in text
    assert "# TYPE hostdev_messages_handled_total counter" in text
