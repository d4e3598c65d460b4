"""The link contract: what a transport MUST provide so the bus can run on it.

The bus (``core.LinkBus``) does everything that is the same on every
transport: it turns a :class:`~hostdev.messages.bus.wire.Delivery` into an
``Incoming``, counts deliveries against the delivery limit, runs
``dispatch.handle_delivery``, publishes the answer on its route, dead-letters
with the reason, requeues, and runs the loop (timers, queued calls, stop). A
link only moves messages. Two links exist: ``amqp_link.AmqpLink`` (RabbitMQ
through kombu/py-amqp: connection, publisher confirms, acks, recovery) and
``in_process_link.InProcessLink`` (an ``InProcessBroker`` in memory).

What MUST hold for any link:

- Threads. Every method except :meth:`Link.wake`, :meth:`Link.request` and
  the callbacks registered with :meth:`Link.on_reconnect` is called from one
  thread at a time: the loop thread inside ``run()``, or the caller before it.
- Publishing. :meth:`Link.send` never loses a message it returned from: it
  is delivered, or (mandatory and unroutable) dead-lettered with the reason.
  It may block (a full confirm window) but not forever while connected.
- Settling. Each delivery from :meth:`Link.take` is settled exactly once by
  :meth:`Link.ack` or :meth:`Link.requeue`, in the order taken. An ack takes
  effect only once everything sent before it is safely with the broker, so an
  answer is never lost between handler and ack. A delivery whose connection is
  gone (:meth:`Link.is_current` False) is redelivered by the broker; settling it
  changes nothing.
- Dead letters. :meth:`Link.dead_letter` puts a copy in ``hostdev.dead`` with
  ``x-hostdev-reason`` (capped, see ``contract.capped``), the queue, exchange
  and routing key it came from, and ``x-hostdev-dead-lettered-by`` equal to
  the copy's ``user_id`` (its own login), before the ack that follows it takes
  effect. A copy never carries the sender's own ``x-hostdev-*`` headers. A
  link whose login may not publish to ``hostdev.dead``
  (:attr:`Link.publishes_dead_letters` False) settles with
  :meth:`Link.reject` instead: the broker dead-letters the message itself.
- Waiting. :meth:`Link.wait` returns when a delivery may be ready, when
  :meth:`Link.wake` was called (from any thread, even before the wait began),
  or after ``timeout`` seconds, whichever is first.
- Failure. A lost connection surfaces as one of :attr:`Link.recoverable`
  from any method; the bus then calls :meth:`Link.recover`, which returns once
  connected again (queues, bindings and consumers restored, unsettled
  deliveries left for redelivery) or raises :class:`Stopped`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from hostdev.messages.base import Message
from hostdev.messages.bus.contract import BusConfig
from hostdev.messages.bus.wire import Delivery, Outgoing


class Stopped(BaseException):
    """stop() was called while the link waited to reconnect (passes through handlers)."""


class Link(Protocol):
    """A transport under the bus; see the module docstring for what MUST hold."""

    config: BusConfig
    #: The login the broker checks ``user_id`` against; stamped on every publish.
    user_id: str
    #: Errors meaning the connection is lost; the bus answers them with recover().
    recoverable: tuple[type[BaseException], ...]

    @property
    def publishes_dead_letters(self) -> bool:
        """False when the login may not publish to hostdev.dead (an agent's user)."""
        ...

    @property
    def connected(self) -> bool:
        """True once connect() succeeded and close() was not called since."""
        ...

    def clock(self) -> float:
        """Returns the time timers run on (seconds; a fake clock in tests)."""
        ...

    def connect(self) -> None:
        """Connects and declares the shared topology; idempotent.

        Raises:
            BusError: the broker cannot be reached; the text says where and why.
        """
        ...

    def close(self) -> None:
        """Waits briefly for what is unconfirmed, then disconnects."""
        ...

    def declare(self, queue: str, exchange: str, bindings: tuple[str, ...]) -> None:
        """Declares a durable queue with its bindings, now and after every reconnect."""
        ...

    def consume(self, queue: str) -> None:
        """Starts consuming a declared queue (idempotent), now and after every reconnect.

        Raises:
            BusError: the queue does not exist.
        """
        ...

    def send(self, outgoing: Outgoing) -> None:
        """Publishes one message (see "Publishing" above).

        Raises:
            BusError: not connected.
        """
        ...

    def wait_confirms(self, timeout: float) -> None:
        """Returns once everything sent so far is safely with the broker.

        Raises:
            BusError: not within ``timeout``, or the broker refused some for good.
        """
        ...

    def request(self, message: Message, timeout: float) -> Message:
        """Sends an API request on ``api.<Type>`` and returns its answer; any thread.

        Raises:
            RequestTimeout: no answer within ``timeout``.
            RemoteError: the answer is an ErrorAnswer.
            BusError: no queue takes ``api.<Type>``, or the answer is undecodable.
        """
        ...

    def take(self) -> Delivery | None:
        """Returns the next delivery already received, without blocking; None if none."""
        ...

    def wait(self, timeout: float) -> None:
        """Blocks until a delivery may be ready, wake() or ``timeout`` (see "Waiting")."""
        ...

    def wake(self) -> None:
        """Makes the current or next wait() return at once; callable from any thread."""
        ...

    def ack(self, delivery: Delivery) -> None:
        """Settles a delivery as handled once everything sent before is confirmed."""
        ...

    def requeue(self, delivery: Delivery) -> None:
        """Settles a delivery by giving it back to its queue, to be delivered again."""
        ...

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Puts a copy of a delivery in ``hostdev.dead`` with ``reason`` (then ack it)."""
        ...

    def reject(self, delivery: Delivery, reason: str) -> None:
        """Settles a delivery by rejecting it without requeue; nothing is published.

        The broker dead-letters it through its queue's dead-letter exchange
        (``x-death`` names the queue and ``rejected``); ``reason`` is logged.
        """
        ...

    def is_current(self, delivery: Delivery) -> bool:
        """Tells whether the connection that carried ``delivery`` is still the one in use."""
        ...

    def flush(self) -> None:
        """Sends what settling left pending (batched acks); a lost connection is ignored."""
        ...

    def recover(self, error: BaseException, stopping: threading.Event) -> None:
        """Re-establishes a lost connection, giving up when ``stopping`` is set.

        Raises:
            Stopped: ``stopping`` was set before the connection came back.
        """
        ...

    def on_reconnect(self, fn: Callable[[], None]) -> None:
        """Calls ``fn`` after every re-established connection, possibly from another thread."""
        ...
