"""The bus both daemons use: contract, dispatch, loop, confirms, RPC and two transports.

``Bus`` talks to RabbitMQ (kombu + py-amqp); ``InProcessBus`` on an
``InProcessBroker`` is its in-process twin for the all-in-one demo and unit
tests. Both implement ``BusLike`` (``contract.py``); daemons code against it.
"""

from __future__ import annotations

from hostdev.messages.bus.amqp import Bus
from hostdev.messages.bus.contract import BusConfig, BusLike, Handler, Incoming
from hostdev.messages.bus.in_process import InProcessBus
from hostdev.messages.bus.in_process_broker import FakeClock, InProcessBroker

__all__ = ["Bus", "BusConfig", "BusLike", "FakeClock", "Handler", "InProcessBroker",
           "InProcessBus", "Incoming"]
