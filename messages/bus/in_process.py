"""An in-process broker and bus with the same interface as the AMQP bus, for tests and demos.

Several :class:`InProcessBus` objects (management + N agents) share one
:class:`InProcessBroker`: topic routing with ``*``/``#``, durable queues,
``hostdev.dead`` with ``x-hostdev-reason``, direct reply-to for
``request()``, delivery limits, timers. Messages travel as encoded bytes, so
decoding and dispatch take the same path as on RabbitMQ (``bus_dispatch``).

Deterministic use in unit tests (no threads)::

    broker = InProcessBroker(clock=FakeClock())
    mgmt, agent = InProcessBus(broker=broker), InProcessBus(broker=broker)
    ...
    broker.drain()              # handle everything pending, on every bus
    broker.dead_letters()       # what was dead-lettered, with reasons

Or threaded: each bus's ``run()`` in its own thread, exactly like the real one.
The broker itself lives in ``bus_memory.py``.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hostdev.messages.base import Message
from hostdev.messages.bus.contract import (
    COMMANDS_EXCHANGE,
    CONTENT_TYPE,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    DIRECT_REPLY_TO,
    EVENTS_EXCHANGE,
    BusConfig,
    BusShortcuts,
    Handler,
    Incoming,
    body_id,
)
from hostdev.messages.bus.dispatch import handle_delivery
from hostdev.messages.bus.in_process_broker import (
    Consumer,
    DeadLetter,
    Envelope,
    FakeClock,
    InProcessBroker,
)
from hostdev.messages.codec import decode, encode
from hostdev.messages.commands import ErrorAnswer
from hostdev.messages.errors import BusError, DecodeError, RemoteError, RequestTimeout

__all__ = ["BusConfig", "DeadLetter", "Envelope", "FakeClock", "InProcessBroker",
           "InProcessBus", "Incoming"]


class InProcessBus(BusShortcuts):
    """The bus interface of ``hostdev.messages.bus.Bus``, on an :class:`InProcessBroker`."""

    def __init__(self, config: BusConfig | None = None, *,
                 broker: InProcessBroker | None = None) -> None:
        self.config = config or BusConfig(url="memory://")
        self.broker = broker or InProcessBroker()
        self.reconnect_callbacks: list[Callable[[], None]] = []
        self.loop_thread: int | None = None
        self._connected = False
        self._user_id = self.config.login_user()
        self._timers: list[tuple[float, int, float, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._soon: deque[Callable[[], None]] = deque()
        self._stop = threading.Event()

    # -- lifecycle and topology -------------------------------------------------

    def connect(self) -> None:
        """Joins the broker (idempotent)."""
        with self.broker.cond:
            if not self._connected:
                self.broker.buses.append(self)
                self._connected = True

    def close(self) -> None:
        """Leaves the broker; its consumers stop."""
        with self.broker.cond:
            self.broker.consumers = [c for c in self.broker.consumers if c.bus is not self]
            if self in self.broker.buses:
                self.broker.buses.remove(self)
            self._connected = False

    def declare_queue(self, name: str, bindings: Sequence[str], *,
                      exchange: str = COMMANDS_EXCHANGE) -> None:
        """Declares a queue bound to ``exchange`` with ``bindings``."""
        self.broker.declare_queue(name, exchange, bindings)


    # -- publishing ----------------------------------------------------------------

    def publish(self, routing_key: str, message: Message, *, exchange: str = COMMANDS_EXCHANGE,
                correlation_id: str | None = None, message_id: str | None = None,
                reply_to: str | None = None, expiration_s: float | None = None,
                headers: dict[str, Any] | None = None) -> str:
        """Publishes ``message``; an unroutable command is dead-lettered. Returns its id."""
        self._require_connected("publish")
        if exchange not in ("", COMMANDS_EXCHANGE, EVENTS_EXCHANGE, DEAD_EXCHANGE):
            raise BusError(f"publish to unknown exchange {exchange!r}; hostdev publishes to "
                           "hostdev.commands, hostdev.events and hostdev.dead only")
        mid = message_id or str(uuid.uuid4())
        props: dict[str, Any] = {
            "content_type": CONTENT_TYPE, "type": type(message).__name__, "message_id": mid,
            "correlation_id": correlation_id, "reply_to": reply_to,
            "timestamp": int(time.time()), "app_id": self.config.app_id,
            "user_id": self._user_id, "delivery_mode": 2, "headers": dict(headers or {})}
        expires = None if expiration_s is None else self.broker.clock() + expiration_s
        self.broker.route(Envelope(exchange, routing_key, encode(message), props,
                                   expires_at=expires),
                          mandatory=exchange == COMMANDS_EXCHANGE)
        return mid

    def wait_for_confirms(self, timeout: float = 30.0) -> None:
        """Returns at once: the in-process broker takes every publish synchronously."""
        self._require_connected("wait_for_confirms")

    def request(self, message: Message, *, timeout: float = 10.0) -> Message:
        """Sends an API request and returns the answer, driving passive buses meanwhile.

        Raises:
            RequestTimeout, RemoteError, BusError: as ``Bus.request``.
        """
        self.connect()
        name = type(message).__name__
        box = f"{DIRECT_REPLY_TO}.{uuid.uuid4().hex}"
        self.broker.declare_queue(box, "", [])
        deadline = time.monotonic() + timeout
        try:
            mid = self.publish(f"api.{name}", message, reply_to=box, expiration_s=timeout)
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
                        return _answer(replies.popleft(), name, mid)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise RequestTimeout(
                            f"no answer to {name} (message_id {mid}) within {timeout:g} s: "
                            f"routing key 'api.{name}' on the in-process broker; is a bus "
                            "consuming queue 'hostdev.api'?")
                    self.broker.cond.wait(min(remaining, 0.05))
        finally:
            with self.broker.cond:
                self.broker.queues.pop(box, None)

    # -- consuming, timers, loop ----------------------------------------------------

    def consume(self, queue: str, handlers: Mapping[type[Message], Handler]) -> None:
        """Consumes ``queue`` (declared first), dispatching by type."""
        self._require_connected("consume")
        with self.broker.cond:
            if queue not in self.broker.queues:
                raise BusError(f"consume({queue!r}): the queue is not declared; declare it first")
            self.broker.consumers.append(Consumer(self, queue, dict(handlers)))
            self.broker.cond.notify_all()

    def call_every(self, interval_s: float, fn: Callable[[], None]) -> None:
        """Runs ``fn`` every ``interval_s`` seconds of the broker's clock."""
        with self.broker.cond:
            heapq.heappush(self._timers, (self.broker.clock() + interval_s, next(self._seq),
                                          interval_s, fn))
            self.broker.cond.notify_all()

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` in the loop (or the next drain) as soon as possible."""
        with self.broker.cond:
            self._soon.append(fn)
            self.broker.cond.notify_all()

    def on_reconnect(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` after a (simulated) reconnect: see ``InProcessBroker.disconnect_all``."""
        self.reconnect_callbacks.append(fn)

    def stop(self) -> None:
        """Makes ``run()`` return after the message in hand."""
        self._stop.set()
        with self.broker.cond:
            self.broker.cond.notify_all()

    def run(self, *, until: Callable[[], bool] | None = None,
            timeout: float | None = None) -> None:
        """Handles this bus's deliveries, timers and calls until stopped, ``until()`` or timeout."""
        self._require_connected("run")
        self.loop_thread = threading.get_ident()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._stop.is_set():
                if until is not None and until():
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    return
                if not self.step():
                    with self.broker.cond:
                        if not self._has_work():
                            self.broker.cond.wait(0.05)
        finally:
            self._stop.clear()
            self.loop_thread = None

    def step(self) -> bool:
        """Does one unit of work (a queued call, a due timer, or one delivery); False if idle."""
        with self.broker.cond:
            fn = self._soon.popleft() if self._soon else None
            if fn is None and self._timers and self._timers[0][0] <= self.broker.clock():
                due, seq, interval, fn = heapq.heappop(self._timers)
                now = self.broker.clock()
                nxt = due + interval if due + interval > now else now + interval  # no bursts
                heapq.heappush(self._timers, (nxt, seq, interval, fn))
        if fn is not None:
            _call_safely(fn)
            return True
        taken = self.broker.take(self)
        if taken is None:
            return False
        self._deliver(*taken)
        return True

    def _has_work(self) -> bool:
        return bool(self._soon) or bool(
            self._timers and self._timers[0][0] <= self.broker.clock()) or any(
            c.bus is self and self.broker.queues.get(c.queue) for c in self.broker.consumers)

    def _deliver(self, consumer: Consumer, envelope: Envelope) -> None:
        props = envelope.properties
        if envelope.expires_at is not None and self.broker.clock() >= envelope.expires_at:
            self.broker.dead_letter(envelope, queue=consumer.queue, reason="expired")
            return
        envelope.delivery_count += 1
        incoming = Incoming(
            message_id=props.get("message_id") or body_id(envelope.body),
            correlation_id=props.get("correlation_id"),
            reply_to=props.get("reply_to"), user_id=props.get("user_id"),
            routing_key=envelope.routing_key, redelivered=envelope.delivery_count > 1,
            headers={**envelope.headers, "x-delivery-count": envelope.delivery_count - 1},
            queue=consumer.queue)
        outcome = handle_delivery(
            envelope.body, content_type=props.get("content_type"),
            type_property=props.get("type"), incoming=incoming, handlers=consumer.handlers,
            attempts=envelope.delivery_count, delivery_limit=self.config.delivery_limit)
        if outcome.action == "dead":
            self.broker.dead_letter(envelope, queue=consumer.queue, reason=outcome.reason)
        if outcome.answer is not None and outcome.route is not None:
            exchange, key = outcome.route
            self.publish(key, outcome.answer, exchange=exchange,
                         correlation_id=incoming.message_id)
        if outcome.action == "requeue":
            with self.broker.cond:
                self.broker.queues[consumer.queue].appendleft(envelope)
                self.broker.cond.notify_all()

    def _require_connected(self, what: str) -> None:
        if not self._connected:
            raise BusError(f"InProcessBus.{what}() before connect(); connect first")


def _answer(envelope: Envelope, name: str, mid: str) -> Message:
    try:
        answer = decode(envelope.body)
    except DecodeError as exc:
        raise BusError(f"the answer to {name} (message_id {mid}) is undecodable: {exc}") from exc
    if isinstance(answer, ErrorAnswer):
        raise RemoteError(f"{name} (message_id {mid}) failed remotely [{answer.code}]: "
                          f"{answer.details}", code=answer.code)
    return answer


def _call_safely(fn: Callable[[], None]) -> None:
    import structlog

    try:
        fn()
    except Exception:
        structlog.get_logger().exception("bus_callback_failed",
                                         callback=getattr(fn, "__qualname__", repr(fn)))
