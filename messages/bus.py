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
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import amqp
import structlog
from kombu.connection import Connection as KombuConnection

from hostdev.messages.base import Message
from hostdev.messages.bus_amqp import (
    CONNECTION_ERRORS,
    KNOWN_EXCHANGES,
    build_message,
    close_quietly,
    dead_letter_copy,
    declare_queue,
    declare_topology,
    drain_ready,
    new_channel,
    open_connection,
    raw,
    wait_readable,
)
from hostdev.messages.bus_api import (
    API_QUEUE,
    COMMANDS_EXCHANGE,
    DEAD_EXCHANGE,
    EVENTS_EXCHANGE,
    MGMT_QUEUE,
    BusConfig,
    Handler,
    Incoming,
    body_id,
)
from hostdev.messages.bus_confirms import ConfirmWindow, Unconfirmed
from hostdev.messages.bus_dispatch import Outcome, handle_delivery
from hostdev.messages.bus_rpc import RpcClient
from hostdev.messages.errors import BusError

__all__ = ["Bus", "BusConfig", "Handler", "Incoming"]

log = structlog.get_logger()

_MAX_REPUBLISH = 3  # a publish lost with this many connections is abandoned (poison reply_to)


class _Stopped(BaseException):
    """stop() was called while the bus waited to reconnect (passes through handlers)."""


class _Broken(Exception):
    """The connection was torn down and must be re-established before use."""


_RECOVERABLE: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, _Broken)
_CLOSE_ERRORS: tuple[type[BaseException], ...] = (BusError, _Stopped, *CONNECTION_ERRORS)


class Bus:
    """The hostdev bus on RabbitMQ. The constructor does no I/O; :meth:`connect` does."""

    def __init__(self, config: BusConfig | None = None) -> None:
        self.config = config or BusConfig()
        self._urls = [u.strip() for u in self.config.url.split(";") if u.strip()]
        self._url_index = 0
        self._conn: KombuConnection | None = None
        self._pub: amqp.Channel | None = None
        self._sub: amqp.Channel | None = None
        self._broken = False
        self._epoch = 0
        self._user_id = self.config.login_user()
        self._window = ConfirmWindow()
        self._abandoned: list[str] = []
        self._queues: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._consumers: dict[str, dict[type[Message], Handler]] = {}
        self._inbox: deque[tuple[int, amqp.Message, str]] = deque()
        self._returned: list[tuple[amqp.Message, str]] = []
        self._attempts: OrderedDict[str, int] = OrderedDict()
        self._timers: list[tuple[float, int, float, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._soon: deque[Callable[[], None]] = deque()
        self._reconnect_callbacks: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._loop_thread: int | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._rpc: RpcClient | None = None
        self._rpc_lock = threading.Lock()
        self._next_heartbeat_check = 0.0

    # -- lifecycle ------------------------------------------------------------

    def connect(self) -> None:
        """Connects (trying each failover URL once) and declares the topology; idempotent.

        Raises:
            BusError: no broker URL answered; the text names them and the last error.
        """
        self._owner_only("connect")
        if self._conn is not None and not self._broken:
            return
        errors = []
        for _ in self._urls:
            try:
                self._open()
                return
            except CONNECTION_ERRORS as exc:
                errors.append(f"{self._current_url()}: {exc!r}")
                self._teardown()
                self._url_index += 1
        raise BusError(f"cannot connect to RabbitMQ ({'; '.join(errors)}); check that the broker "
                       "runs, and the URL, user, password and vhost in the configuration")

    def close(self) -> None:
        """Waits briefly for outstanding confirms and acks, then closes every connection."""
        if self._conn is not None and not self._broken:
            try:
                self._wait_confirms(5.0)
            except _CLOSE_ERRORS as exc:
                log.warning("bus_close_unconfirmed", error=str(exc), unconfirmed=len(self._window))
        close_quietly(self._conn)
        self._conn = self._pub = self._sub = None
        with self._rpc_lock:
            if self._rpc is not None:
                self._rpc.close()
                self._rpc = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- topology -------------------------------------------------------------

    def declare_queue(self, name: str, bindings: Sequence[str], *,
                      exchange: str = COMMANDS_EXCHANGE) -> None:
        """Declares a durable queue bound to ``exchange``; re-declared after every reconnect."""
        self._owner_only("declare_queue")
        self._queues[name] = (exchange, tuple(bindings))
        if self._pub is not None and not self._broken:
            declare_queue(self._pub, self.config, name, exchange, bindings)

    def declare_agent_queue(self, guid: str) -> str:
        """Declares ``hostdev.agent.<guid>`` bound to ``agent.<guid>.#``; returns its name."""
        name = f"hostdev.agent.{guid}"
        self.declare_queue(name, [f"agent.{guid}.#"])
        return name

    def declare_mgmt_queues(self) -> None:
        """Declares ``hostdev.mgmt`` (binds ``mgmt.#``) and ``hostdev.api`` (binds ``api.#``)."""
        self.declare_queue(MGMT_QUEUE, ["mgmt.#"])
        self.declare_queue(API_QUEUE, ["api.#"])

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
            message, config=self.config, user_id=self._user_id, message_id=message_id,
            correlation_id=correlation_id, reply_to=reply_to, expiration_s=expiration_s,
            headers=headers)
        self._send(Unconfirmed(exchange, routing_key, amqp_message,
                               exchange == COMMANDS_EXCHANGE, mid))
        return mid

    def send_to_agent(self, guid: str, message: Message, *, correlation_id: str | None = None,
                      message_id: str | None = None) -> str:
        """Publishes a command to one agent on ``agent.<guid>.<Type>``."""
        return self.publish(f"agent.{guid}.{type(message).__name__}", message,
                            correlation_id=correlation_id, message_id=message_id)

    def send_to_mgmt(self, guid: str, message: Message, *, correlation_id: str | None = None,
                     message_id: str | None = None) -> str:
        """Publishes an agent's message to management on ``mgmt.<guid>.<Type>``."""
        return self.publish(f"mgmt.{guid}.{type(message).__name__}", message,
                            correlation_id=correlation_id, message_id=message_id)

    def publish_event(self, routing_key: str, event: Message, *,
                      message_id: str | None = None) -> str:
        """Publishes an event on ``hostdev.events``."""
        return self.publish(routing_key, event, exchange=EVENTS_EXCHANGE, message_id=message_id)

    def wait_for_confirms(self, timeout: float = 30.0) -> None:
        """Returns once every publish so far is confirmed (reconnecting if needed).

        Raises:
            BusError: not all were confirmed within ``timeout``, or the broker
                refused some repeatedly (their message ids are named).
        """
        self._owner_only("wait_for_confirms")
        try:
            self._wait_confirms(timeout)
        except _Stopped:
            raise BusError("bus stopped before all publishes were confirmed") from None
        if self._abandoned:
            ids, self._abandoned = self._abandoned, []
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
                self._rpc = RpcClient(self.config, self._urls, self._user_id)
            return self._rpc.call(message, timeout=timeout)

    # -- consuming and the loop -------------------------------------------------

    def consume(self, queue: str, handlers: Mapping[type[Message], Handler]) -> None:
        """Consumes ``queue`` (already declared), dispatching each message by type."""
        self._owner_only("consume")
        self._consumers[queue] = dict(handlers)
        if self._sub is not None and not self._broken:
            self._start_consumer(queue)

    def call_every(self, interval_s: float, fn: Callable[[], None]) -> None:
        """Runs ``fn`` in the loop thread every ``interval_s`` seconds, first after one."""
        heapq.heappush(self._timers, (time.monotonic() + interval_s, next(self._timer_seq),
                                      interval_s, fn))
        self._wake()

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` in the loop thread as soon as possible; callable from any thread."""
        self._soon.append(fn)
        self._wake()

    def on_reconnect(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` in the loop thread after every re-established connection."""
        self._reconnect_callbacks.append(fn)

    def stop(self) -> None:
        """Makes :meth:`run` return after the message in hand; thread-safe."""
        self._stop.set()
        self._wake()

    def run(self, *, until: Callable[[], bool] | None = None,
            timeout: float | None = None) -> None:
        """Handles deliveries, timers and queued calls until stopped, ``until()`` or ``timeout``.

        Reconnects with exponential backoff and full jitter on connection loss,
        re-declares queues and consumers, republishes unconfirmed messages and
        then runs the :meth:`on_reconnect` callbacks.
        """
        if self._conn is None:
            raise BusError("Bus.run() before Bus.connect(); connect first")
        self._loop_thread = threading.get_ident()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._stop.is_set():
                if until is not None and until():
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    return
                try:
                    self._iteration(deadline)
                except _RECOVERABLE as exc:
                    self._recover(exc)
        except _Stopped:
            pass
        finally:
            self._stop.clear()
            self._loop_thread = None

    def _iteration(self, deadline: float | None) -> None:
        if self._broken or self._conn is None:
            raise _Broken()
        now = time.monotonic()
        if now >= self._next_heartbeat_check:
            self._next_heartbeat_check = now + 1.0
            self._conn.heartbeat_check(rate=2)  # type: ignore[no-untyped-call]
        self._run_soon()
        self._run_timers()
        if self._inbox:
            self._handle(*self._inbox.popleft())
            if not self._inbox:
                self._pump(0.0)
            return
        self._pump(self._next_wait(deadline))

    def _next_wait(self, deadline: float | None) -> float:
        now = time.monotonic()
        wait = 1.0
        if self.config.heartbeat:
            wait = min(wait, self.config.heartbeat / 4)
        if self._timers:
            wait = min(wait, self._timers[0][0] - now)
        if deadline is not None:
            wait = min(wait, deadline - now)
        if self._soon:
            wait = 0.0
        return max(0.0, wait)

    def _run_soon(self) -> None:
        while self._soon:
            fn = self._soon.popleft()
            self._call_safely(fn, "call_soon")

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            due, seq, interval, fn = heapq.heappop(self._timers)
            nxt = due + interval if due + interval > now else now + interval  # no bursts
            heapq.heappush(self._timers, (nxt, seq, interval, fn))
            self._call_safely(fn, "timer")

    def _call_safely(self, fn: Callable[[], None], kind: str) -> None:
        try:
            fn()
        except CONNECTION_ERRORS:
            raise
        except Exception:
            log.exception("bus_callback_failed", kind=kind, callback=getattr(fn, "__qualname__",
                                                                             repr(fn)))

    # -- handling one delivery ------------------------------------------------

    def _on_delivery(self, queue: str) -> Callable[[amqp.Message], None]:
        epoch = self._epoch

        def deliver(message: amqp.Message) -> None:
            self._inbox.append((epoch, message, queue))

        return deliver

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
        attempts = max(int(count) + 1 if isinstance(count, int) else 1,
                       self._attempts.get(mid, 0) + 1)
        outcome = handle_delivery(
            message.body, content_type=props.get("content_type"), type_property=props.get("type"),
            incoming=incoming, handlers=self._consumers.get(queue, {}), attempts=attempts,
            delivery_limit=self.config.delivery_limit)
        if outcome.action == "requeue":
            self._attempts[mid] = attempts
            while len(self._attempts) > 10_000:
                self._attempts.popitem(last=False)
        else:
            self._attempts.pop(mid, None)
        self._settle(epoch, message, queue, incoming, outcome)

    def _settle(self, epoch: int, message: amqp.Message, queue: str, incoming: Incoming,
                outcome: Outcome) -> None:
        if epoch != self._epoch:
            # The connection was replaced while the handler ran: the broker
            # redelivers the message. Its answer is still sent (a duplicate at
            # worst) in case the idempotent rerun answers nothing.
            if outcome.action == "ack" and outcome.answer is not None and outcome.route:
                self._publish_answer(outcome, incoming)
            log.info("delivery_left_for_redelivery", message_id=incoming.message_id)
            return
        if outcome.action == "dead":
            self._send(Unconfirmed(DEAD_EXCHANGE, queue, dead_letter_copy(
                message, queue=queue, reason=outcome.reason, user_id=self._user_id),
                False, incoming.message_id))
        if outcome.answer is not None and outcome.route:
            self._publish_answer(outcome, incoming)
        if epoch != self._epoch:
            return
        tag = message.delivery_info["delivery_tag"]
        assert self._sub is not None
        if outcome.action == "requeue":
            self._sub.basic_reject(tag, requeue=True)
            return
        self._window.defer((epoch, tag))
        self._flush_acks()

    def _publish_answer(self, outcome: Outcome, incoming: Incoming) -> None:
        assert outcome.answer is not None and outcome.route is not None
        exchange, key = outcome.route
        amqp_message, mid = build_message(
            outcome.answer, config=self.config, user_id=self._user_id, message_id=None,
            correlation_id=incoming.message_id, reply_to=None, expiration_s=None, headers=None)
        self._send(Unconfirmed(exchange, key, amqp_message, exchange == COMMANDS_EXCHANGE, mid))

    def _flush_acks(self) -> None:
        ready = self._window.ready()
        if not ready or self._sub is None:
            return
        for epoch, tag in ready:
            if epoch == self._epoch:
                self._sub.basic_ack(tag)

    # -- confirms ---------------------------------------------------------------

    def _send(self, item: Unconfirmed) -> None:
        while True:
            if self._conn is None:
                raise BusError("publish before Bus.connect(); connect first")
            try:
                if self._broken:
                    raise _Broken()
                while len(self._window) >= self.config.confirm_window:
                    self._pump(self.config.heartbeat or 5.0)
                assert self._pub is not None
                self._pub.basic_publish(item.message, item.exchange, item.routing_key,
                                        mandatory=item.mandatory)
                self._window.published(item)
                return
            except _RECOVERABLE as exc:
                self._recover(exc)

    def _wait_confirms(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self._window) or self._returned:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BusError(f"{len(self._window)} publish(es) not confirmed by the broker "
                               f"within {timeout:g} s ({self.config.safe_url()})")
            try:
                if self._broken:
                    raise _Broken()
                self._pump(min(remaining, 1.0))
            except _RECOVERABLE as exc:
                self._recover(exc)
        self._flush_acks()

    def _pump(self, timeout: float) -> None:
        """Reads what the broker sent (waiting up to ``timeout``), then settles confirms."""
        assert self._conn is not None
        conn = raw(self._conn)
        if timeout > 0:
            readable = wait_readable(conn, self._wake_r, timeout)
            self._drain_wake_pipe()
            if not readable:
                return
        if drain_ready(conn):
            self._after_frames()

    def _after_frames(self) -> None:
        if self._returned:
            returned, self._returned = self._returned, []
            for message, reason in returned:
                log.error("message_unroutable", reason=reason,
                          message_id=message.properties.get("message_id"))
                copy = dead_letter_copy(message, queue="", reason=reason, user_id=self._user_id)
                self._send(Unconfirmed(DEAD_EXCHANGE, "", copy, False,
                                       str(message.properties.get("message_id"))))
            self._window.hold_back_deferred()
        self._flush_acks()

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._window.acked(tag, multiple)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        for item in self._window.nacked(tag, multiple):
            item.nacks += 1
            if item.nacks > _MAX_REPUBLISH:
                log.error("bus_publish_abandoned", message_id=item.message_id,
                          exchange=item.exchange, routing_key=item.routing_key, nacks=item.nacks)
                self._abandoned.append(item.message_id)
                continue
            log.warning("bus_publish_nacked", message_id=item.message_id, nacks=item.nacks)
            assert self._pub is not None
            self._pub.basic_publish(item.message, item.exchange, item.routing_key,
                                    mandatory=item.mandatory)
            self._window.published(item)
        self._window.hold_back_deferred()

    def _on_return(self, exc: Exception, exchange: str, routing_key: str,
                   message: amqp.Message) -> None:
        reason = (f"unroutable: no queue is bound to routing key {routing_key!r} on exchange "
                  f"{exchange!r} ({exc}); is the receiver's queue declared?")
        message.delivery_info = {"exchange": exchange, "routing_key": routing_key}
        self._returned.append((message, reason))

    # -- connection management -------------------------------------------------

    def _current_url(self) -> str:
        return self._urls[self._url_index % len(self._urls)]

    def _open(self) -> None:
        conn = open_connection(self._current_url(), self.config)
        self._conn = conn
        login = str(conn.userid)
        if self.config.user_id is not None and self.config.user_id != login:
            raise BusError(f"BusConfig.user_id {self.config.user_id!r} differs from the login "
                           f"{login!r}; the broker would refuse every publish")
        self._user_id = login
        pub = new_channel(conn)
        pub.confirm_select()
        pub.events["basic_ack"].add(self._on_ack)
        pub.events["basic_nack"].add(self._on_nack)
        pub.events["basic_return"].add(self._on_return)
        declare_topology(pub, self.config)
        for name, (exchange, bindings) in self._queues.items():
            declare_queue(pub, self.config, name, exchange, bindings)
        sub = new_channel(conn)
        sub.basic_qos(0, self.config.prefetch, False)
        self._pub, self._sub = pub, sub
        self._broken = False
        for queue in self._consumers:
            self._start_consumer(queue)
        for item in self._window.reset():
            item.nacks += 1
            if item.nacks > _MAX_REPUBLISH:
                log.error("bus_publish_abandoned", message_id=item.message_id,
                          routing_key=item.routing_key, reason="lost with several connections")
                self._abandoned.append(item.message_id)
                continue
            pub.basic_publish(item.message, item.exchange, item.routing_key,
                              mandatory=item.mandatory)
            self._window.published(item)
        log.info("bus_connected", url=_safe(self._current_url()), epoch=self._epoch,
                 republished=len(self._window))

    def _start_consumer(self, queue: str) -> None:
        assert self._sub is not None
        self._sub.basic_consume(queue, callback=self._on_delivery(queue),
                                on_cancel=self._on_cancel)

    def _on_cancel(self, consumer_tag: str) -> None:
        # The broker cancels a consumer whose queue was deleted (or failed over):
        # reconnecting re-declares the queue and consumes it again.
        log.warning("bus_consumer_cancelled", consumer_tag=consumer_tag)
        self._broken = True

    def _teardown(self) -> None:
        close_quietly(self._conn)
        self._conn = self._pub = self._sub = None
        self._broken = True
        self._epoch += 1
        self._inbox.clear()  # unacked: the broker redelivers them

    def _recover(self, error: BaseException) -> None:
        log.warning("bus_connection_lost", error=repr(error), url=_safe(self._current_url()))
        self._teardown()
        attempt = 0
        while True:
            if self._stop.is_set():
                raise _Stopped()
            try:
                self._open()
                break
            except CONNECTION_ERRORS as exc:
                attempt += 1
                self._teardown()
                self._url_index += 1
                delay = random.uniform(0, min(self.config.reconnect_max_s, 0.2 * 2 ** attempt))
                log.warning("bus_reconnect_failed", error=repr(exc), attempt=attempt,
                            retry_in_s=round(delay, 2))
                self._stop.wait(delay)
        log.info("bus_reconnected", attempts=attempt + 1)
        for fn in self._reconnect_callbacks:
            self._soon.append(fn)

    def _owner_only(self, what: str) -> None:
        owner = self._loop_thread
        if owner is not None and owner != threading.get_ident():
            raise BusError(f"Bus.{what}() called from another thread while run() owns the "
                           "connection; wrap the call in bus.call_soon_threadsafe(...)")

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # pipe full (already woken) or closed
            os.write(self._wake_w, b"x")

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass


def _safe(url: str) -> str:
    return BusConfig(url=url).safe_url()
