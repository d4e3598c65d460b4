"""The bus both daemons use: one bus class on two transports behind one link contract.

``core.LinkBus`` does everything that is the same on every transport;
``link.Link`` is what a transport provides. ``Bus`` is the bus on RabbitMQ
(``amqp_link``, kombu + py-amqp); ``InProcessBus`` the bus on an in-memory
``InProcessBroker`` (``in_process_link``), for the all-in-one demo and unit
tests. Both implement ``BusLike`` (``contract.py``); daemons code against it.
"""

from __future__ import annotations

from hostdev.messages.bus.amqp import Bus
from hostdev.messages.bus.contract import (
    BatchHandler,
    Batching,
    BusConfig,
    BusLike,
    Handler,
    Incoming,
)
from hostdev.messages.bus.in_process import InProcessBus
from hostdev.messages.bus.in_process_broker import FakeClock, InProcessBroker

__all__ = ["BatchHandler", "Batching", "Bus", "BusConfig", "BusLike", "FakeClock", "Handler",
           "InProcessBroker", "InProcessBus", "Incoming"]
