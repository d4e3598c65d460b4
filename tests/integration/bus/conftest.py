"""Fixtures for the bus integration tests: a RabbitMQ vhost per module, buses that clean up."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from hostdev.messages.bus import Bus, BusConfig
from tests.support.rabbitmq import Vhost, amqp_vhost


@pytest.fixture(scope="module")
def vhost() -> Iterator[Vhost]:
    """A fresh vhost for the test module, deleted afterwards."""
    with amqp_vhost("bus") as created:
        yield created


class BusRunner:
    """Makes connected buses and runs their loops in threads; stops and closes all at the end."""

    def __init__(self, vhost: Vhost) -> None:
        self.vhost = vhost
        self.buses: list[Bus] = []
        self.threads: list[tuple[Bus, threading.Thread]] = []

    def bus(self, **config: object) -> Bus:
        """Returns a connected bus on the vhost."""
        settings: dict[str, object] = {"heartbeat": 10, **config}
        bus = Bus(BusConfig(url=self.vhost.url, **settings))  # type: ignore[arg-type]
        bus.connect()
        self.buses.append(bus)
        return bus

    def start(self, bus: Bus) -> threading.Thread:
        """Runs ``bus.run()`` in a thread."""
        thread = threading.Thread(target=bus.run, name="bus-loop", daemon=True)
        thread.start()
        self.threads.append((bus, thread))
        return thread

    def stop_all(self) -> None:
        for bus, thread in self.threads:
            bus.stop()
            thread.join(15)
        for bus in self.buses:
            bus.close()


@pytest.fixture
def runner(vhost: Vhost) -> Iterator[BusRunner]:
    """Buses on the module's vhost, stopped and closed after the test."""
    made = BusRunner(vhost)
    yield made
    made.stop_all()
