"""The hostdev bus on RabbitMQ: ``core.LinkBus`` on an ``amqp_link.AmqpLink``.

Guarantees (what MUST hold; see docs/bus-contract.md):

- Every publish is persistent and confirmed, up to ``confirm_window`` in
  flight; unconfirmed publishes are republished (same ``message_id``) after a
  nack or a reconnect: receivers may see duplicates, never a loss.
- A consumed message is acked only after its handler returned AND everything
  the handler published (its answer, a dead-letter copy) is confirmed. If the
  connection drops in between, the broker redelivers it and the handler runs
  again: handlers MUST be idempotent by ``message_id``.
- Nothing is dropped: undecodable, unknown, unhandled and failed messages go
  to ``hostdev.dead`` with ``x-hostdev-reason``; unroutable commands too.
- One thread owns the connection: the one in ``run()`` (or the caller before
  ``run``). Other threads use ``call_soon_threadsafe``; ``request`` has a
  connection of its own.
"""

from __future__ import annotations

from hostdev.messages.bus.amqp_link import AmqpLink
from hostdev.messages.bus.contract import BusConfig, Handler, Incoming
from hostdev.messages.bus.core import LinkBus

__all__ = ["Bus", "BusConfig", "Handler", "Incoming"]


class Bus(LinkBus):
    """The hostdev bus on RabbitMQ. The constructor does no I/O; :meth:`connect` does."""

    def __init__(self, config: BusConfig | None = None) -> None:
        config = config or BusConfig()
        super().__init__(config, AmqpLink(config))
