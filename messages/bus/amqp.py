"""The AMQP bus on RabbitMQ (kombu + py-amqp): topology, publishing, consuming, RPC.

Guarantees (what MUST hold; see docs/bus-contract.md):

- Every publish is persistent and confirmed. Up to ``confirm_window``
  confirms are in flight; kombu's ``confirm_publish`` waits for each one in
  turn, so the bus puts kombu's py-amqp channel in confirm mode itself and
  follows ``basic.ack``/``basic.nack``. Unconfirmed publishes are kept and
  republished (same ``message_id``) after a nack or a reconnect: receivers
  may see duplicates, never a loss.
- A consumed message is acked only after its handler returned AND everything
  the handler published (its answer, a dead-letter copy) is confirmed. If the
  connection drops in between, the broker redelivers it and the handler runs
  again: handlers MUST be idempotent by ``message_id``.
- Nothing is dropped: undecodable, unknown, unhandled and failed messages go
  to ``hostdev.dead`` with ``x-hostdev-reason``; unroutable commands too.
- One thread owns the connection: the one in :meth:`Bus.run` (or the caller
  before ``run``). Other threads use :meth:`Bus.call_soon_threadsafe`.
  A handler blocks the loop (and heartbeats): keep it short.

The connection, confirms and recovery live in ``bus_link.AmqpLink``; timers
and cross-thread calls in ``bus_loop.LoopScheduler``; the verdict on each
delivery in ``bus_dispatch``; request/response in ``bus_rpc``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import amqp
import structlog

from hostdev.messages.base import Message
from hostdev.messages.bus.amqp_link import RECOVERABLE, AmqpLink, Broken, Stopped
from hostdev.messages.bus.amqp_message import KNOWN_EXCHANGES, build_message, dead_letter_copy
from hostdev.messages.bus.confirms import Unconfirmed
from hostdev.messages.bus.contract import (
    COMMANDS_EXCHANGE,
    DEAD_EXCHANGE,
    DIRECT_REPLY_TO,
    BusConfig,
    BusShortcuts,
    Handler,
    Incoming,
    body_id,
)
from hostdev.messages.bus.dispatch import Outcome, handle_delivery
from hostdev.messages.bus.loop import LoopScheduler
from hostdev.messages.bus.rpc import RpcClient
from hostdev.messages.errors import BusError

__all__ = ["Bus", "BusConfig", "Handler", "Incoming"]

log = structlog.get_logger()

_ACK_BATCH = 16  # deliveries handled between two (multiple) acks while more are waiting
_CLOSE_ERRORS: tuple[type[BaseException], ...] = (BusError, Stopped, *RECOVERABLE)


class Bus(BusShortcuts):
    """The hostdev bus on RabbitMQ. The constructor does no I/O; :meth:`connect` does."""

    def __init__(self, config: BusConfig | None = None) -> None:
        self.config = config or BusConfig()
        self._loop = LoopScheduler(reraise=RECOVERABLE)
        self._link = AmqpLink(self.config, self._loop)
        self._handlers: dict[str, dict[type[Message], Handler]] = {}
        self._attempts: OrderedDict[str, int] = OrderedDict()
        self._loop_thread: int | None = None
        self._rpc: RpcClient | None = None
        self._rpc_lock = threading.Lock()
        self._next_heartbeat_check = 0.0
        self._since_flush = 0

    # -- lifecycle ------------------------------------------------------------

    def connect(self) -> None:
        """Connects (trying each failover URL once) and declares the topology; idempotent.

        Raises:
            BusError: no broker URL answered; the text names them and the last error.
        """
        self._owner_only("connect")
        if not self._link.usable:
            if self._link.conn is not None:
                self._link.teardown()  # a broken connection is replaced, not leaked
            self._link.connect_once()

    def close(self) -> None:
        """Waits briefly for outstanding confirms and acks, then closes every connection."""
        if self._link.usable:
            try:
                self._link.wait_confirms(5.0, time.monotonic)
            except _CLOSE_ERRORS as exc:
                log.warning("bus_close_unconfirmed", error=str(exc),
                            unconfirmed=len(self._link.window))
        self._link.close()
        with self._rpc_lock:
            if self._rpc is not None:
                self._rpc.close()
                self._rpc = None
        self._loop.close()

    # -- topology -------------------------------------------------------------

    def declare_queue(self, name: str, bindings: Sequence[str], *,
                      exchange: str = COMMANDS_EXCHANGE) -> None:
        """Declares a durable queue bound to ``exchange``; re-declared after every reconnect."""
        self._owner_only("declare_queue")
        self._link.declare(name, exchange, tuple(bindings))


    # -- publishing -----------------------------------------------------------

    def publish(self, routing_key: str, message: Message, *, exchange: str = COMMANDS_EXCHANGE,
                correlation_id: str | None = None, message_id: str | None = None,
                reply_to: str | None = None, expiration_s: float | None = None,
                headers: dict[str, Any] | None = None) -> str:
        """Publishes a persistent message; blocks only while ``confirm_window`` confirms are out.

        Commands are published ``mandatory``: one no queue takes is dead-lettered
        with the reason instead of vanishing. Returns the ``message_id``.
        """
        self._owner_only("publish")
        if exchange not in KNOWN_EXCHANGES:
            raise BusError(f"publish to unknown exchange {exchange!r}; hostdev publishes to "
                           f"{sorted(KNOWN_EXCHANGES)} only")
        amqp_message, mid = build_message(
            message, config=self.config, user_id=self._link.user_id, message_id=message_id,
            correlation_id=correlation_id, reply_to=reply_to, expiration_s=expiration_s,
            headers=headers)
        self._link.send(Unconfirmed(exchange, routing_key, amqp_message,
                                    exchange == COMMANDS_EXCHANGE, mid))
        return mid

    def wait_for_confirms(self, timeout: float = 30.0) -> None:
        """Returns once every publish so far is confirmed (reconnecting if needed).

        Raises:
            BusError: not all were confirmed within ``timeout``, or the broker
                refused some repeatedly (their message ids are named).
        """
        self._owner_only("wait_for_confirms")
        try:
            self._link.wait_confirms(timeout, time.monotonic)
        except Stopped:
            raise BusError("bus stopped before all publishes were confirmed") from None
        if self._link.abandoned:
            ids, self._link.abandoned = self._link.abandoned, []
            raise BusError(f"the broker refused {len(ids)} publish(es) repeatedly: {ids[:10]}; "
                           "see the bus_publish_abandoned log lines")

    def request(self, message: Message, *, timeout: float = 10.0) -> Message:
        """Sends an API request on ``api.<Type>`` and returns the typed answer.

        Uses its own connection (direct reply-to), so any thread may call it.

        Raises:
            RequestTimeout: no answer within ``timeout``.
            RemoteError: the answer was an ErrorAnswer.
            BusError: no queue takes ``api.<Type>``, or the answer was undecodable.
        """
        with self._rpc_lock:
            if self._rpc is None:
                self._rpc = RpcClient(self.config, self._link.urls, self._link.user_id)
            return self._rpc.call(message, timeout=timeout)

    # -- consuming and the loop -------------------------------------------------

    def consume(self, queue: str, handlers: Mapping[type[Message], Handler]) -> None:
        """Consumes ``queue`` (already declared), dispatching each message by type."""
        self._owner_only("consume")
        self._handlers[queue] = dict(handlers)
        self._link.consume(queue)

    def call_every(self, interval_s: float, fn: Callable[[], None]) -> None:
        """Runs ``fn`` in the loop thread every ``interval_s`` seconds, first after one."""
        self._loop.call_every(interval_s, fn)

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` in the loop thread as soon as possible; callable from any thread."""
        self._loop.call_soon(fn)

    def on_reconnect(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` in the loop thread after every re-established connection."""
        self._link.reconnect_callbacks.append(fn)

    def stop(self) -> None:
        """Makes :meth:`run` return after the message in hand; thread-safe."""
        self._loop.stop()

    def run(self, *, until: Callable[[], bool] | None = None,
            timeout: float | None = None) -> None:
        """Handles deliveries, timers and queued calls until stopped, ``until()`` or ``timeout``.

        Reconnects with exponential backoff and full jitter on connection loss,
        re-declares queues and consumers, republishes unconfirmed messages and
        then runs the :meth:`on_reconnect` callbacks.
        """
        if self._link.conn is None:
            raise BusError("Bus.run() before Bus.connect(); connect first")
        self._loop_thread = threading.get_ident()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._loop.stopping.is_set():
                if until is not None and until():
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    return
                try:
                    self._iteration(deadline)
                except RECOVERABLE as exc:
                    self._link.recover(exc)
        except Stopped:
            pass
        finally:
            self._loop.stopping.clear()
            self._loop_thread = None
            if self._link.usable:
                with contextlib.suppress(*RECOVERABLE):  # acks of a dead link are moot
                    self._link.flush_acks()

    def _iteration(self, deadline: float | None) -> None:
        link = self._link
        conn = link.conn
        if conn is None or link.broken:
            raise Broken()
        now = time.monotonic()
        if now >= self._next_heartbeat_check:
            self._next_heartbeat_check = now + 1.0
            conn.heartbeat_check(rate=2)  # type: ignore[no-untyped-call]
        self._loop.run_due()
        if link.inbox:
            self._handle(*link.inbox.popleft())
            self._since_flush += 1
            if link.usable and (not link.inbox or self._since_flush >= _ACK_BATCH):
                self._since_flush = 0
                link.flush_acks()
                if not link.inbox:
                    link.pump(0.0)
            return
        cap = min(1.0, self.config.heartbeat / 4) if self.config.heartbeat else 1.0
        link.pump(self._loop.next_wait(deadline, cap))

    # -- handling one delivery ------------------------------------------------

    def _handle(self, epoch: int, message: amqp.Message, queue: str) -> None:
        props = message.properties
        info = message.delivery_info
        headers = props.get("application_headers") or {}
        mid = props.get("message_id") or body_id(message.body)
        incoming = Incoming(
            message_id=mid, correlation_id=props.get("correlation_id"),
            reply_to=props.get("reply_to"), user_id=props.get("user_id"),
            routing_key=info["routing_key"], redelivered=bool(info["redelivered"]),
            headers=dict(headers), queue=queue)
        count = headers.get("x-delivery-count")
        local = self._remember(mid, self._attempts.get(mid, 1) + 1) if incoming.redelivered else 1
        attempts = max(int(count) + 1 if isinstance(count, int) else 1, local)
        limit = self.config.delivery_limit
        if attempts > limit:
            # Delivered again and again without ever being settled: the connection
            # died each time (e.g. the broker kills it for a forged reply_to). No
            # answer is attempted, it could be what kills the connection.
            outcome = Outcome("dead", reason=(
                f"delivered {attempts} times without being settled, over the delivery limit "
                f"{limit} (the connection was lost each time; a reply_to the broker rejects?) "
                f"(queue {queue!r}, message_id {mid})"))
            log.error("message_dead_lettered", reason=outcome.reason, message_id=mid)
        else:
            outcome = handle_delivery(
                message.body, content_type=props.get("content_type"),
                type_property=props.get("type"), incoming=incoming,
                handlers=self._handlers.get(queue, {}), attempts=attempts, delivery_limit=limit)
        if outcome.action == "requeue":
            self._remember(mid, attempts)  # classic queues count no deliveries for us
        # Otherwise the count is kept (bounded): an ack only counts once confirmed,
        # and a connection lost before that brings the message back.
        self._settle(epoch, message, queue, incoming, outcome)

    def _remember(self, mid: str, attempts: int) -> int:
        self._attempts[mid] = attempts
        while len(self._attempts) > 10_000:
            self._attempts.popitem(last=False)
        return attempts

    def _settle(self, epoch: int, message: amqp.Message, queue: str, incoming: Incoming,
                outcome: Outcome) -> None:
        link = self._link
        if epoch != link.epoch:
            # The connection was replaced while the handler ran: the broker
            # redelivers the message. Its answer is still sent (a duplicate at
            # worst) in case the idempotent rerun answers nothing.
            if outcome.action == "ack" and outcome.answer is not None and outcome.route:
                self._publish_answer(outcome, incoming)
            log.info("delivery_left_for_redelivery", message_id=incoming.message_id)
            return
        if outcome.action == "dead":
            link.send(Unconfirmed(DEAD_EXCHANGE, queue, dead_letter_copy(
                message, queue=queue, reason=outcome.reason, user_id=link.user_id),
                False, incoming.message_id))
        if outcome.answer is not None and outcome.route:
            self._publish_answer(outcome, incoming)
        tag = message.delivery_info["delivery_tag"]
        if outcome.action == "requeue":
            link.reject(epoch, tag)
        elif epoch == link.epoch:
            link.ack_when_confirmed(epoch, tag)

    def _publish_answer(self, outcome: Outcome, incoming: Incoming) -> None:
        assert outcome.answer is not None and outcome.route is not None
        exchange, key = outcome.route
        amqp_message, mid = build_message(
            outcome.answer, config=self.config, user_id=self._link.user_id, message_id=None,
            correlation_id=incoming.message_id, reply_to=None, expiration_s=None, headers=None)
        self._link.send(Unconfirmed(exchange, key, amqp_message, exchange == COMMANDS_EXCHANGE,
                                    mid, republish=not key.startswith(DIRECT_REPLY_TO)))

    def _owner_only(self, what: str) -> None:
        owner = self._loop_thread
        if owner is not None and owner != threading.get_ident():
            raise BusError(f"Bus.{what}() called from another thread while run() owns the "
                           "connection; wrap the call in bus.call_soon_threadsafe(...)")
