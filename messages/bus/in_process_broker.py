"""The in-process broker behind ``hostdev.messages.bus.in_process``: exchanges, queues, routing.

Holds messages as encoded bytes with AMQP-like properties; thread-safe (one
condition variable). See ``testing.py`` for how tests drive it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hostdev.messages.base import Message
from hostdev.messages.bus.contract import (
    COMMANDS_EXCHANGE,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    EVENTS_EXCHANGE,
    REASON_HEADER,
    Handler,
    topic_matches,
)
from hostdev.messages.codec import decode
from hostdev.messages.errors import DecodeError

if TYPE_CHECKING:
    from hostdev.messages.bus.in_process import InProcessBus


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


@dataclass
class Consumer:
    """One bus consuming one queue with its handlers."""

    bus: InProcessBus
    queue: str
    handlers: dict[type[Message], Handler] = field(default_factory=dict)


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
        self.buses: list[InProcessBus] = []
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

    def dead_letter(self, envelope: Envelope, *, queue: str, reason: str) -> None:
        """Puts a copy of ``envelope`` in hostdev.dead with ``x-hostdev-reason``."""
        props = dict(envelope.properties)
        headers = dict(props.get("headers") or {})
        headers.update({REASON_HEADER: reason, "x-hostdev-queue": queue,
                        "x-hostdev-exchange": envelope.exchange,
                        "x-hostdev-routing-key": envelope.routing_key})
        props["headers"] = headers
        props.pop("expiration", None)
        with self.cond:
            self.queues[DEAD_QUEUE].append(Envelope(DEAD_EXCHANGE, envelope.routing_key,
                                                    envelope.body, props))
            self.cond.notify_all()

    def disconnect_all(self) -> None:
        """Simulates a lost and re-established connection: on_reconnect callbacks run next."""
        with self.cond:
            for bus in self.buses:
                for fn in bus.reconnect_callbacks:
                    bus.call_soon_threadsafe(fn)

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
        """Runs every bus not inside ``run()``: queued calls, due timers, deliveries.

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
                passive = [b for b in self.buses if b.loop_thread is None]
                progressed = False
                for bus in passive:  # one step each in turn: competing consumers share
                    progressed = bus.step() or progressed
                if not progressed:
                    return steps
                steps += 1
            raise RuntimeError(f"InProcessBroker.drain(): still busy after {max_steps} steps; "
                               "are two handlers answering each other forever?")
        finally:
            self._draining = False

    def take(self, bus: InProcessBus) -> tuple[Consumer, Envelope] | None:
        """Takes the next deliverable message for one of ``bus``'s consumers (round-robin)."""
        with self.cond:
            mine = [c for c in self.consumers if c.bus is bus and self.queues.get(c.queue)]
            if not mine:
                return None
            consumer = mine[next(self._rr) % len(mine)]
            return consumer, self.queues[consumer.queue].popleft()


def _copy(envelope: Envelope) -> Envelope:
    return Envelope(envelope.exchange, envelope.routing_key, envelope.body,
                    dict(envelope.properties), 0, envelope.expires_at)
