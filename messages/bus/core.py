"""The bus on any link: what is the same on every transport, written once.

:class:`LinkBus` implements ``BusLike`` on a ``link.Link``. It builds every
publish, turns each delivery into an ``Incoming``, counts deliveries against
``BusConfig.delivery_limit``, decodes it and asks ``dispatch`` for the
verdict (for a run of a batched type, ``dispatch.handle_batch``), publishes
the answer on its route, dead-letters with the reason or requeues, and runs
the loop: timers and queued calls (``loop.LoopScheduler``), deliveries,
stop, and recovery when the link reports a lost connection.
``amqp.Bus`` and ``in_process.InProcessBus`` only choose the link.

One thread owns the link: the one in :meth:`LinkBus.run` (or the caller before
``run``). Other threads use :meth:`LinkBus.call_soon_threadsafe`. A handler
blocks the loop: keep it short.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from hostdev.messages.base import Message
from hostdev.messages.bus.contract import (
    COMMANDS_EXCHANGE,
    KNOWN_EXCHANGES,
    Batching,
    BusConfig,
    BusShortcuts,
    Handler,
    Incoming,
    body_id,
    capped,
)
from hostdev.messages.bus.dispatch import (
    BatchItem,
    Outcome,
    decode_delivery,
    handle_batch,
    handle_message,
)
from hostdev.messages.bus.link import Link, Stopped
from hostdev.messages.bus.loop import LoopScheduler
from hostdev.messages.bus.wire import Delivery, new_outgoing
from hostdev.messages.errors import BusError
from hostdev.messages.runtime import metrics

log = structlog.get_logger()

_REMEMBERED = 10_000  # message ids whose delivery count the bus keeps itself


@dataclass(slots=True)
class _Run:
    """Deliveries of one queue collected for one batch handler, each with its place taken."""

    batching: Batching
    items: list[tuple[int, Delivery, BatchItem]]
    due: float


class LinkBus(BusShortcuts):
    """The hostdev bus on one link. The constructor does no I/O; :meth:`connect` does."""

    def __init__(self, config: BusConfig, link: Link) -> None:
        self.config = config
        self._link = link
        self._loop = LoopScheduler(wake=link.wake, clock=link.clock, reraise=link.recoverable)
        self._handlers: dict[str, dict[type[Message], Handler]] = {}
        self._batches: dict[str, dict[type[Message], Batching]] = {}
        #: The runs being collected, one per queue: its batching, deliveries (each with
        #: its place in the order they were taken) and when it is due.
        self._runs: dict[str, _Run] = {}
        self._taken = 0
        self._attempts: OrderedDict[str, int] = OrderedDict()
        self._reconnect_callbacks: list[Callable[[], None]] = []
        self._loop_thread: int | None = None
        link.on_reconnect(self._reconnected)

    # -- lifecycle and topology ---------------------------------------------------

    def connect(self) -> None:
        """Connects (trying each failover URL once) and declares the topology; idempotent.

        Raises:
            BusError: the broker cannot be reached; the text names where and why.
        """
        self._owner_only("connect")
        self._link.connect()

    def close(self) -> None:
        """Waits briefly for outstanding confirms and acks, then disconnects."""
        self._link.close()

    def declare_queue(self, name: str, bindings: Sequence[str], *,
                      exchange: str = COMMANDS_EXCHANGE) -> None:
        """Declares a durable queue bound to ``exchange``; re-declared after every reconnect."""
        self._owner_only("declare_queue")
        self._link.declare(name, exchange, tuple(bindings))

    # -- publishing ---------------------------------------------------------------

    def publish(self, routing_key: str, message: Message, *, exchange: str = COMMANDS_EXCHANGE,
                correlation_id: str | None = None, message_id: str | None = None,
                reply_to: str | None = None, expiration_s: float | None = None,
                headers: dict[str, Any] | None = None,
                on_confirmed: Callable[[], None] | None = None) -> str:
        """Publishes a persistent message; blocks only while ``confirm_window`` confirms are out.

        Commands are published ``mandatory``: one no queue takes is dead-lettered
        with the reason instead of vanishing. Returns the ``message_id``.
        ``on_confirmed`` is called on the loop thread once the broker confirmed
        the message (after republishing it if the broker refused it or the
        connection was lost), never if the bus gave it up (see
        ``wait_for_confirms``); it must neither block nor raise.
        """
        self._owner_only("publish")
        if exchange not in KNOWN_EXCHANGES:
            raise BusError(f"publish to unknown exchange {exchange!r}; hostdev publishes to "
                           f"{sorted(KNOWN_EXCHANGES)} only")
        outgoing = new_outgoing(
            message, exchange=exchange, routing_key=routing_key, app_id=self.config.app_id,
            user_id=self._link.user_id, message_id=message_id, correlation_id=correlation_id,
            reply_to=reply_to, expiration_s=expiration_s, headers=headers,
            on_confirmed=on_confirmed)
        self._link.send(outgoing)
        return outgoing.message_id

    def wait_for_confirms(self, timeout: float = 30.0) -> None:
        """Returns once every publish so far is confirmed (reconnecting if needed).

        Raises:
            BusError: not all were confirmed within ``timeout``, or the broker
                refused some repeatedly (their message ids are named).
        """
        self._owner_only("wait_for_confirms")
        self._link.wait_confirms(timeout)

    def request(self, message: Message, *, timeout: float = 10.0) -> Message:
        """Sends an API request on ``api.<Type>`` and returns the typed answer; any thread.

        Raises:
            RequestTimeout: no answer within ``timeout``.
            RemoteError: the answer was an ErrorAnswer.
            BusError: no queue takes ``api.<Type>``, or the answer was undecodable.
        """
        return self._link.request(message, timeout)

    # -- consuming and the loop -----------------------------------------------------

    def consume(self, queue: str, handlers: Mapping[type[Message], Handler],
                batches: Mapping[type[Message], Batching] | None = None) -> None:
        """Consumes ``queue`` (already declared), dispatching each message by type.

        A type in ``batches`` is handled in runs of consecutive deliveries by
        its batch handler (see ``contract.Batching``) instead of its handler.
        """
        self._owner_only("consume")
        self._link.consume(queue)
        self._handlers[queue] = dict(handlers)
        self._batches[queue] = dict(batches or {})

    def call_every(self, interval_s: float, fn: Callable[[], None]) -> None:
        """Runs ``fn`` in the loop thread every ``interval_s`` seconds, first after one."""
        self._loop.call_every(interval_s, fn)

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` in the loop thread as soon as possible; callable from any thread."""
        self._loop.call_soon(fn)

    def on_reconnect(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` in the loop thread after every re-established connection."""
        self._reconnect_callbacks.append(fn)

    def stop(self) -> None:
        """Makes :meth:`run` return after the message in hand; thread-safe."""
        self._loop.stop()

    def run(self, *, until: Callable[[], bool] | None = None,
            timeout: float | None = None) -> None:
        """Handles deliveries, timers and queued calls until stopped, ``until()`` or ``timeout``.

        When the link loses its connection, the link recovers it (re-declaring
        queues and consumers) and then the :meth:`on_reconnect` callbacks run.
        """
        if not self._link.connected:
            raise BusError(f"{type(self).__name__}.run() before connect(); connect first")
        self._loop_thread = threading.get_ident()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._loop_until(until, deadline)
            self._finish_runs()
        except Stopped:
            pass
        finally:
            self._runs.clear()
            self._loop.stopping.clear()
            self._loop_thread = None
            self._link.flush()

    def _loop_until(self, until: Callable[[], bool] | None, deadline: float | None) -> None:
        while not self._loop.stopping.is_set():
            if until is not None and until():
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            try:
                if not self._step(linger=True):
                    self._link.wait(self._wait_s(deadline))
            except self._link.recoverable as exc:
                self._runs.clear()  # their deliveries come again on the new connection
                self._link.recover(exc, self._loop.stopping)

    def step(self) -> bool:
        """Does the work that is ready, without blocking: queued calls, due timers, one delivery.

        Lets a caller drive a bus that is not inside :meth:`run` (the in-process
        broker's ``drain()``); a bus inside ``run()`` is left to its own loop.

        Returns:
            False if there was nothing to do (or ``run()`` owns the loop).
        """
        if self._loop_thread is not None:
            return False
        return self._step()

    def _step(self, *, linger: bool = False) -> bool:
        ran = self._loop.run_due()
        delivery = self._link.take()
        if delivery is None:
            # Without lingering (a caller draining the bus), a run is handled at once.
            if self._runs and (not linger or time.monotonic() >= self._due()):
                self._handle_runs()
                return True
            return ran
        self._handle(delivery)
        return True

    def _wait_s(self, deadline: float | None) -> float:
        wait = self._loop.next_wait(deadline, 1.0)
        if self._runs:
            wait = min(wait, max(0.0, self._due() - time.monotonic()))
        return wait

    def _due(self) -> float:
        """Returns when the first of the runs being collected is due."""
        return min(run.due for run in self._runs.values())

    def _finish_runs(self) -> None:
        """Handles the runs collected so far before ``run()`` returns (none is left unsettled)."""
        if not self._runs or not all(self._link.is_current(run.items[0][1])
                                     for run in self._runs.values()):
            return
        # A lost connection: the broker delivers the runs again.
        with contextlib.suppress(*self._link.recoverable):
            self._handle_runs()

    def _handle_runs(self) -> None:
        """Handles every run being collected (one per queue: the broker keeps no order
        between queues), then settles their deliveries in the order taken, as the
        link's ``multiple`` acks need."""
        runs = list(self._runs.values())
        self._runs.clear()
        settled: list[tuple[int, Delivery, BatchItem, Outcome]] = []
        for run in runs:
            outcomes = handle_batch([item for _, _, item in run.items], run.batching.handler,
                                    self.config.delivery_limit)
            settled += [(taken, delivery, item, outcome) for (taken, delivery, item), outcome
                        in zip(run.items, outcomes, strict=True)]
        settled.sort(key=lambda entry: entry[0])
        for _, delivery, item, outcome in settled:
            self._settled(delivery, item.incoming, outcome, item.attempts)

    def _reconnected(self) -> None:
        for fn in self._reconnect_callbacks:
            self._loop.call_soon(fn)

    # -- handling one delivery --------------------------------------------------------

    def _handle(self, delivery: Delivery) -> None:
        props = delivery.properties
        # The body hash only counts this bus's own deliveries; handlers see the
        # sender's id or none, so identical messages without one are not merged.
        mid = props.get("message_id") or body_id(delivery.body)
        incoming = Incoming(
            message_id=props.get("message_id") or None, correlation_id=props.get("correlation_id"),
            reply_to=props.get("reply_to"), user_id=props.get("user_id"),
            routing_key=delivery.routing_key, redelivered=delivery.redelivered,
            headers=delivery.headers, queue=delivery.queue)  # the delivery's own copy
        count = delivery.headers.get("x-delivery-count")
        local = self._remember(mid, self._attempts.get(mid, 1) + 1) if delivery.redelivered else 1
        attempts = max(int(count) + 1 if isinstance(count, int) else 1, local)
        limit = self.config.delivery_limit
        if attempts > limit:
            # Delivered again and again without ever being settled: the connection
            # died each time (e.g. the broker kills it for a forged reply_to). No
            # answer is attempted and no copy published, either could be what
            # kills the connection: the broker dead-letters it itself.
            outcome = Outcome("dead", reason=capped(
                f"delivered {attempts} times without being settled, over the delivery limit "
                f"{limit} (the connection was lost each time; a reply_to the broker rejects?) "
                f"(queue {delivery.queue!r}, message_id {mid})"), copy=False)
            log.error("message_dead_lettered", reason=outcome.reason, message_id=mid)
        else:
            decoded = decode_delivery(delivery.body, content_type=props.get("content_type"),
                                      type_property=props.get("type"), incoming=incoming)
            batching = None if isinstance(decoded, Outcome) \
                else self._batches.get(delivery.queue, {}).get(type(decoded))
            if batching is not None:
                assert not isinstance(decoded, Outcome)
                self._collect(batching, delivery, BatchItem(decoded, incoming, attempts))
                return
            if self._runs:
                self._handle_runs()  # the runs before this delivery: the queue's order holds
            outcome = metrics.count(decoded if isinstance(decoded, Outcome) else handle_message(
                decoded, incoming=incoming, handlers=self._handlers.get(delivery.queue, {}),
                attempts=attempts, delivery_limit=limit))
        if self._runs:
            self._handle_runs()
        self._settled(delivery, incoming, outcome, attempts)

    def _collect(self, batching: Batching, delivery: Delivery, item: BatchItem) -> None:
        """Adds a delivery to its queue's run; handles the runs once one is full, or
        first when its queue's run is of another batching (a queue's order holds)."""
        run = self._runs.get(delivery.queue)
        if run is not None and run.batching is not batching:
            self._handle_runs()
            run = None
        if run is None:
            # Real time, not the link's clock: a fake one (tests) would hold a run back.
            run = self._runs[delivery.queue] = _Run(batching, [],
                                                    time.monotonic() + batching.linger_s)
        self._taken += 1
        run.items.append((self._taken, delivery, item))
        if len(run.items) >= batching.max_size:
            self._handle_runs()

    def _settled(self, delivery: Delivery, incoming: Incoming, outcome: Outcome,
                 attempts: int) -> None:
        mid = incoming.message_id or body_id(delivery.body)
        if outcome.action == "requeue":
            self._remember(mid, attempts)  # classic queues count no deliveries for us
        # Otherwise the count is kept (bounded): an ack only counts once confirmed,
        # and a connection lost before that brings the message back.
        self._settle(delivery, incoming, outcome)

    def _remember(self, mid: str, attempts: int) -> int:
        self._attempts[mid] = attempts
        while len(self._attempts) > _REMEMBERED:
            self._attempts.popitem(last=False)
        return attempts

    def _settle(self, delivery: Delivery, incoming: Incoming, outcome: Outcome) -> None:
        link = self._link
        if not link.is_current(delivery):
            # The connection was replaced while the handler ran: the broker
            # redelivers the message. Its answer is still sent (a duplicate at
            # worst) in case the idempotent rerun answers nothing.
            if outcome.action == "ack":
                self._answer(outcome, incoming)
            log.info("delivery_left_for_redelivery", message_id=incoming.message_id)
        elif outcome.action == "dead" and not (outcome.copy and link.publishes_dead_letters):
            # Rejected without requeue: the broker dead-letters it through the
            # queue's dead-letter exchange (x-death names the queue), as this
            # login may not or must not publish a copy itself.
            link.reject(delivery, outcome.reason)
            self._answer(outcome, incoming)
            return
        else:
            if outcome.action == "dead":
                link.dead_letter(delivery, outcome.reason)
            self._answer(outcome, incoming)
        if outcome.action == "requeue":
            link.requeue(delivery)
        else:
            link.ack(delivery)

    def _answer(self, outcome: Outcome, incoming: Incoming) -> None:
        if outcome.answer is None or outcome.route is None:
            return
        exchange, key = outcome.route
        self._link.send(new_outgoing(
            outcome.answer, exchange=exchange, routing_key=key, app_id=self.config.app_id,
            user_id=self._link.user_id, correlation_id=incoming.message_id))

    def _owner_only(self, what: str) -> None:
        owner = self._loop_thread
        if owner is not None and owner != threading.get_ident():
            raise BusError(f"{type(self).__name__}.{what}() called from another thread while "
                           "run() owns the connection; wrap the call in "
                           "bus.call_soon_threadsafe(...)")
