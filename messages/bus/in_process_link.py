"""The in-process link: ``link.Link`` on an ``InProcessBroker``, no network.

Publishing routes synchronously into the broker's queues, so there is nothing
to confirm and nothing to recover; a delivery is settled the moment it is
acked. A message whose expiration passed while queued is dead-lettered as
``expired`` instead of delivered, as RabbitMQ does.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

from hostdev.messages.base import Message
from hostdev.messages.bus.contract import (
    COMMANDS_EXCHANGE,
    DEAD_QUEUE,
    DIRECT_REPLY_TO,
    BusConfig,
    publishes_dead_letters,
)
from hostdev.messages.bus.in_process_broker import Consumer, Envelope, InProcessBroker
from hostdev.messages.bus.wire import Delivery, Outgoing, decode_answer, new_outgoing
from hostdev.messages.errors import BusError, RequestTimeout

_MAX_WAIT = 0.05  # a fake clock moved by another thread wakes no one: look again this often


class InProcessLink:
    """One bus's attachment to an :class:`InProcessBroker` (see ``link.Link``)."""

    recoverable: tuple[type[BaseException], ...] = ()

    def __init__(self, config: BusConfig, broker: InProcessBroker) -> None:
        self.config = config
        self.broker = broker
        self.user_id = config.login_user()
        #: The attached bus's non-blocking step, driven by ``broker.drain()``.
        self.driver: Callable[[], bool] = lambda: False
        self._connected = False
        self._woken = False
        self._reconnect_callbacks: list[Callable[[], None]] = []

    @property
    def connected(self) -> bool:
        """True between connect() and close()."""
        return self._connected

    def clock(self) -> float:
        """Returns the broker's clock (a ``FakeClock`` in deterministic tests)."""
        return self.broker.clock()

    # -- what the broker calls (``in_process_broker.Member``) ------------------------

    def step(self) -> bool:
        """Runs the bus's ready work once; False if idle or inside ``run()``."""
        return self.driver()

    def reconnected(self) -> None:
        """Runs the on_reconnect callbacks, as after a real reconnect."""
        for fn in self._reconnect_callbacks:
            fn()

    # -- lifecycle and topology ----------------------------------------------------

    def connect(self) -> None:
        """Attaches to the broker (idempotent)."""
        self.broker.attach(self)
        self._connected = True

    def close(self) -> None:
        """Detaches from the broker; this link's consumers stop."""
        self.broker.detach(self)
        self._connected = False

    def on_reconnect(self, fn: Callable[[], None]) -> None:
        """Calls ``fn`` whenever ``broker.disconnect_all()`` simulates a reconnect."""
        self._reconnect_callbacks.append(fn)

    def recover(self, error: BaseException, stopping: threading.Event) -> None:
        """Never called: nothing here is recoverable, so the error is raised again."""
        raise error

    def declare(self, queue: str, exchange: str, bindings: tuple[str, ...]) -> None:
        """Declares a queue with its bindings in the broker."""
        self.broker.declare_queue(queue, exchange, bindings)

    def consume(self, queue: str) -> None:
        """Consumes a declared queue (idempotent).

        Raises:
            BusError: not connected, or the queue is not declared.
        """
        self._require_connected("consume")
        with self.broker.cond:
            if queue not in self.broker.queues:
                raise BusError(f"consume({queue!r}): the queue is not declared; declare it first")
            if not any(c.owner is self and c.queue == queue for c in self.broker.consumers):
                self.broker.consumers.append(Consumer(self, queue))
            self.broker.cond.notify_all()

    # -- publishing -------------------------------------------------------------------

    def send(self, outgoing: Outgoing) -> None:
        """Routes ``outgoing`` now (so it is confirmed at once); an unroutable command is
        dead-lettered."""
        self._require_connected("publish")
        props = dict(outgoing.properties)
        props["headers"] = dict(outgoing.headers)
        expires = (None if outgoing.expiration_s is None
                   else self.broker.clock() + outgoing.expiration_s)
        self.broker.route(Envelope(outgoing.exchange, outgoing.routing_key, outgoing.body, props,
                                   expires_at=expires), mandatory=outgoing.mandatory)
        if outgoing.on_confirmed is not None:
            outgoing.on_confirmed()

    def wait_confirms(self, timeout: float) -> None:
        """Returns at once: the broker takes every publish synchronously."""
        self._require_connected("wait_for_confirms")

    def request(self, message: Message, timeout: float) -> Message:
        """Sends an API request and returns the answer, draining the broker meanwhile."""
        self.connect()
        name = type(message).__name__
        box = f"{DIRECT_REPLY_TO}.{uuid.uuid4().hex}"
        self.broker.declare_queue(box, "", [])
        deadline = time.monotonic() + timeout
        outgoing = new_outgoing(message, exchange=COMMANDS_EXCHANGE, routing_key=f"api.{name}",
                                app_id=self.config.app_id, user_id=self.user_id, reply_to=box,
                                expiration_s=timeout)
        mid = outgoing.message_id
        try:
            self.send(outgoing)
            with self.broker.cond:
                unroutable = not self.broker.queues[box] and any(
                    e.properties.get("message_id") == mid for e in self.broker.queues[DEAD_QUEUE])
            if unroutable:
                raise BusError(f"{name} (message_id {mid}) cannot be delivered: no queue is "
                               f"bound to routing key 'api.{name}'; declare queue 'hostdev.api'")
            while True:
                self.broker.drain()
                with self.broker.cond:
                    replies = self.broker.queues[box]
                    if replies:
                        return decode_answer(replies.popleft().body, name, mid)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise RequestTimeout(
                            f"no answer to {name} (message_id {mid}) within {timeout:g} s: "
                            f"routing key 'api.{name}' on the in-process broker; is a bus "
                            "consuming queue 'hostdev.api'?")
                    self.broker.cond.wait(min(remaining, _MAX_WAIT))
        finally:
            with self.broker.cond:
                self.broker.queues.pop(box, None)

    # -- deliveries -----------------------------------------------------------------------

    def take(self) -> Delivery | None:
        """Takes the next message of a queue this link consumes; expired ones are dead-lettered."""
        while True:
            taken = self.broker.take(self)
            if taken is None:
                return None
            consumer, envelope = taken
            if envelope.expires_at is not None and self.broker.clock() >= envelope.expires_at:
                self.broker.dead_letter(envelope, queue=consumer.queue, reason="expired")
                continue
            envelope.delivery_count += 1
            return Delivery(
                body=envelope.body, properties=envelope.properties,
                headers={**envelope.headers, "x-delivery-count": envelope.delivery_count - 1},
                routing_key=envelope.routing_key, redelivered=envelope.delivery_count > 1,
                queue=consumer.queue, token=envelope)

    def wait(self, timeout: float) -> None:
        """Waits for a message, a wake() or ``timeout`` (at most ``_MAX_WAIT``)."""
        with self.broker.cond:
            if not self._woken and not self.broker.has_deliveries(self):
                self.broker.cond.wait(min(timeout, _MAX_WAIT))
            self._woken = False

    def wake(self) -> None:
        """Makes the current or next wait() return; callable from any thread."""
        with self.broker.cond:
            self._woken = True
            self.broker.cond.notify_all()

    @property
    def publishes_dead_letters(self) -> bool:
        """False for an agent's user (``agent-<guid>``), as on RabbitMQ with its permissions."""
        return publishes_dead_letters(self.user_id)

    def is_current(self, delivery: Delivery) -> bool:
        """Always True: an in-process connection is never lost."""
        return True

    def ack(self, delivery: Delivery) -> None:
        """Nothing to do: the broker handed the message over when it was taken."""

    def requeue(self, delivery: Delivery) -> None:
        """Puts the message back at the head of its queue."""
        self.broker.requeue(delivery.queue, delivery.token)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Puts a copy in hostdev.dead with the reason, marked as dead-lettered by this user."""
        self.broker.dead_letter(delivery.token, queue=delivery.queue, reason=reason,
                                by=self.user_id)

    def reject(self, delivery: Delivery, reason: str) -> None:
        """Dead-letters it as the broker would: ``x-death``, the reason only in the log."""
        self.broker.reject(delivery.queue, delivery.token)

    def flush(self) -> None:
        """Nothing to do: acks are not batched here."""

    def _require_connected(self, what: str) -> None:
        if not self._connected:
            raise BusError(f"InProcessBus.{what}() before connect(); connect first")
