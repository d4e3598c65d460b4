"""The bus in one process: ``core.LinkBus`` on an ``InProcessLink``, for tests and the demo.

Several :class:`InProcessBus` objects (management + N agents) share one
:class:`InProcessBroker`: topic routing with ``*``/``#``, durable queues,
``hostdev.dead`` with ``x-hostdev-reason``, direct reply-to for
``request()``, delivery limits, timers. Messages travel as encoded bytes and
the bus is the same class as on RabbitMQ, so decoding, dispatch, answers and
dead-lettering take the same path.

Deterministic use in unit tests (no threads)::

    broker = InProcessBroker(clock=FakeClock())
    mgmt, agent = InProcessBus(broker=broker), InProcessBus(broker=broker)
    ...
    broker.drain()              # handle everything pending, on every bus
    broker.dead_letters()       # what was dead-lettered, with reasons

Or threaded: each bus's ``run()`` in its own thread, exactly like the real one.
"""

from __future__ import annotations

from hostdev.messages.bus.contract import BusConfig, Incoming
from hostdev.messages.bus.core import LinkBus
from hostdev.messages.bus.in_process_broker import DeadLetter, Envelope, FakeClock, InProcessBroker
from hostdev.messages.bus.in_process_link import InProcessLink

__all__ = ["BusConfig", "DeadLetter", "Envelope", "FakeClock", "InProcessBroker",
           "InProcessBus", "Incoming"]


class InProcessBus(LinkBus):
    """The hostdev bus on an :class:`InProcessBroker` (a new private one if none is given)."""

    def __init__(self, config: BusConfig | None = None, *,
                 broker: InProcessBroker | None = None) -> None:
        self.broker = broker or InProcessBroker()
        link = InProcessLink(config or BusConfig(url="memory://"), self.broker)
        super().__init__(link.config, link)
        link.driver = self.step
