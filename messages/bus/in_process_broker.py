"""The in-process broker: exchanges, queues, topic routing, dead letters, in memory.

Holds messages as encoded bytes with AMQP-like properties; thread-safe (one
condition variable). Links (``in_process_link.InProcessLink``) attach to it as
:class:`Member` objects, which is how :meth:`InProcessBroker.drain` steps their
buses and :meth:`InProcessBroker.disconnect_all` simulates a reconnect. See
``in_process.py`` for how tests and the demo drive it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hostdev.messages.base import Message
from hostdev.messages.bus.contract import (
    COMMANDS_EXCHANGE,
    DEAD_EXCHANGE,
    DEAD_LETTERED_BY_HEADER,
    DEAD_QUEUE,
    DROPPED_DEAD_LETTER_HEADERS,
    EVENTS_EXCHANGE,
    REASON_HEADER,
    capped,
    topic_matches,
)
from hostdev.messages.codec import decode
from hostdev.messages.errors import DecodeError


class FakeClock:
    """A clock that moves only when told; pass it to InProcessBroker for timer tests."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Moves the clock forward."""
        self.now += seconds


@dataclass
class Envelope:
    """One message as the broker holds it: body bytes and AMQP properties."""

    exchange: str
    routing_key: str
    body: bytes
    properties: dict[str, Any]
    delivery_count: int = 0
    expires_at: float | None = None

    @property
    def headers(self) -> dict[str, Any]:
        """The AMQP headers."""
        return dict(self.properties.get("headers") or {})

    def message(self) -> Message | None:
        """Decodes the body, or None if it does not decode."""
        try:
            return decode(self.body)
        except DecodeError:
            return None


@dataclass(frozen=True)
class DeadLetter:
    """A message in ``hostdev.dead``, with why and where it failed."""

    reason: str
    queue: str
    routing_key: str
    envelope: Envelope

    @property
    def message(self) -> Message | None:
        """The decoded message, or None if it was undecodable."""
        return self.envelope.message()


class Member(Protocol):
    """What the broker needs of an attached link."""

    def step(self) -> bool:
        """Does the ready work of the link's bus without blocking; False if idle or in run()."""
        ...

    def reconnected(self) -> None:
        """Tells the link's bus that its connection was re-established."""
        ...


@dataclass(frozen=True)
class Consumer:
    """One attached link consuming one queue."""

    owner: Member
    queue: str


class InProcessBroker:
    """Exchanges, queues and bindings in memory, shared by several buses; thread-safe."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.cond = threading.Condition(threading.RLock())
        self.queues: dict[str, deque[Envelope]] = {DEAD_QUEUE: deque()}
        self.bindings: dict[str, list[tuple[str, str]]] = {
            COMMANDS_EXCHANGE: [], EVENTS_EXCHANGE: [], DEAD_EXCHANGE: [("#", DEAD_QUEUE)]}
        self.published: list[Envelope] = []
        self.consumers: list[Consumer] = []
        self.members: list[Member] = []
        self._rr = itertools.count()
        self._draining = False

    # -- broker operations ---------------------------------------------------

    def declare_queue(self, name: str, exchange: str, bindings: Sequence[str]) -> None:
        """Creates a queue (if new) and adds its bindings (idempotent)."""
        with self.cond:
            self.queues.setdefault(name, deque())
            for key in bindings:
                if (key, name) not in self.bindings.setdefault(exchange, []):
                    self.bindings[exchange].append((key, name))

    def route(self, envelope: Envelope, *, mandatory: bool) -> None:
        """Delivers ``envelope`` to the queues bound to its exchange and key.

        An unroutable mandatory message is dead-lettered with the reason.
        """
        with self.cond:
            self.published.append(envelope)
            if envelope.exchange == "":
                targets = [envelope.routing_key] if envelope.routing_key in self.queues else []
            else:
                targets = sorted({q for key, q in self.bindings.get(envelope.exchange, [])
                                  if envelope.exchange == DEAD_EXCHANGE
                                  or topic_matches(key, envelope.routing_key)})
            for queue in targets:
                self.queues[queue].append(_copy(envelope))
            if not targets and mandatory:
                self.dead_letter(envelope, queue="", reason=(
                    f"unroutable: no queue is bound to routing key {envelope.routing_key!r} on "
                    f"exchange {envelope.exchange!r}; is the receiver's queue declared?"))
            self.cond.notify_all()

    def dead_letter(self, envelope: Envelope, *, queue: str, reason: str,
                    by: str | None = None) -> None:
        """Puts a copy of ``envelope`` in hostdev.dead with ``x-hostdev-reason`` (capped).

        Args:
            envelope: the message.
            queue: the queue it was consumed from ("" for an unroutable one).
            reason: why, for an operator.
            by: the user of the bus that dead-letters it: the copy's ``user_id``
                and ``x-hostdev-dead-lettered-by``, as on RabbitMQ (None: the
                broker itself, e.g. an expired message).
        """
        props = dict(envelope.properties)
        headers = {key: value for key, value in (props.get("headers") or {}).items()
                   if not key.startswith(DROPPED_DEAD_LETTER_HEADERS)}
        headers.update({REASON_HEADER: capped(reason), "x-hostdev-queue": queue,
                        "x-hostdev-exchange": envelope.exchange,
                        "x-hostdev-routing-key": envelope.routing_key})
        if by is not None:
            sender = props.get("user_id")
            if sender:
                headers["x-hostdev-user-id"] = sender
            headers[DEAD_LETTERED_BY_HEADER] = by
            props["user_id"] = by
        props["headers"] = headers
        props.pop("expiration", None)
        with self.cond:
            self.queues[DEAD_QUEUE].append(Envelope(DEAD_EXCHANGE, envelope.routing_key,
                                                    envelope.body, props))
            self.cond.notify_all()

    def reject(self, queue: str, envelope: Envelope) -> None:
        """Dead-letters a rejected message as RabbitMQ does: ``x-death``, no hostdev headers."""
        props = dict(envelope.properties)
        props["headers"] = {**(props.get("headers") or {}), "x-death": [
            {"count": 1, "reason": "rejected", "queue": queue,
             "exchange": envelope.exchange, "routing-keys": [envelope.routing_key]}]}
        props.pop("expiration", None)
        with self.cond:
            self.queues[DEAD_QUEUE].append(Envelope(DEAD_EXCHANGE, envelope.routing_key,
                                                    envelope.body, props))
            self.cond.notify_all()

    def requeue(self, queue: str, envelope: Envelope) -> None:
        """Puts a delivered message back at the head of its queue."""
        with self.cond:
            self.queues[queue].appendleft(envelope)
            self.cond.notify_all()

    def attach(self, member: Member) -> None:
        """Adds a link to the broker (idempotent)."""
        with self.cond:
            if member not in self.members:
                self.members.append(member)

    def detach(self, member: Member) -> None:
        """Removes a link and its consumers."""
        with self.cond:
            self.consumers = [c for c in self.consumers if c.owner is not member]
            if member in self.members:
                self.members.remove(member)

    def disconnect_all(self) -> None:
        """Simulates a lost and re-established connection: on_reconnect callbacks run next."""
        with self.cond:
            for member in self.members:
                member.reconnected()

    # -- inspection helpers for tests -------------------------------------------

    def dead_letters(self) -> list[DeadLetter]:
        """Returns what waits in hostdev.dead, oldest first (without consuming it)."""
        with self.cond:
            return [DeadLetter(reason=str(e.headers.get(REASON_HEADER, "")),
                               queue=str(e.headers.get("x-hostdev-queue", "")),
                               routing_key=e.routing_key, envelope=e)
                    for e in self.queues[DEAD_QUEUE]]

    def pending(self, queue: str) -> list[Message | None]:
        """Returns the decoded messages waiting in ``queue``."""
        with self.cond:
            return [e.message() for e in self.queues[queue]]

    def sent(self, message_type: type[Message] | None = None) -> list[tuple[str, Message]]:
        """Returns (routing key, message) of everything published, optionally of one type."""
        with self.cond:
            out = [(e.routing_key, m) for e in self.published if (m := e.message()) is not None]
        return [(k, m) for k, m in out if message_type is None or isinstance(m, message_type)]

    # -- driving ----------------------------------------------------------------

    def drain(self, *, max_steps: int = 100_000) -> int:
        """Steps every attached bus not inside ``run()``: queued calls, due timers, deliveries.

        Returns when nothing is left to do; returns the number of steps.

        Raises:
            RuntimeError: still busy after ``max_steps`` (messages bouncing forever).
        """
        if self._draining:  # a handler calling request(): do not recurse
            return 0
        self._draining = True
        try:
            steps = 0
            while steps < max_steps:
                progressed = False
                for member in list(self.members):  # one step each: competing consumers share
                    progressed = member.step() or progressed
                if not progressed:
                    return steps
                steps += 1
            raise RuntimeError(f"InProcessBroker.drain(): still busy after {max_steps} steps; "
                               "are two handlers answering each other forever?")
        finally:
            self._draining = False

    def has_deliveries(self, owner: Member) -> bool:
        """Tells whether a queue ``owner`` consumes holds a message."""
        with self.cond:
            return any(c.owner is owner and self.queues.get(c.queue) for c in self.consumers)

    def take(self, owner: Member) -> tuple[Consumer, Envelope] | None:
        """Takes the next deliverable message for one of ``owner``'s consumers (round-robin)."""
        with self.cond:
            mine = [c for c in self.consumers if c.owner is owner and self.queues.get(c.queue)]
            if not mine:
                return None
            consumer = mine[next(self._rr) % len(mine)]
            return consumer, self.queues[consumer.queue].popleft()


def _copy(envelope: Envelope) -> Envelope:
    return Envelope(envelope.exchange, envelope.routing_key, envelope.body,
                    dict(envelope.properties), 0, envelope.expires_at)
