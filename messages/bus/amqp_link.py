"""The AMQP link: RabbitMQ through kombu + py-amqp, under ``core.LinkBus``.

:class:`AmqpLink` implements ``link.Link`` on an ``AmqpConnection``. kombu's
``confirm_publish`` waits for each confirm in turn, so the connection puts its
channel in confirm mode itself and follows ``basic.ack``/``basic.nack``: up to
``confirm_window`` confirms are in flight. Every unconfirmed publish is
republished (same ``message_id``) after a nack or a reconnect: receivers may
see duplicates, never a loss. Acks wait for the confirms they depend on and go
out as one ``multiple`` ack per batch. Requests use a connection of their own
(``rpc.RpcClient``), so any thread may send them.
"""

from __future__ import annotations

import contextlib
import threading
import time

import structlog

from hostdev.messages.base import Message
from hostdev.messages.bus.amqp_connection import RECOVERABLE, AmqpConnection, Broken
from hostdev.messages.bus.amqp_message import close_quietly, dead_letter_copy, to_amqp
from hostdev.messages.bus.confirms import Unconfirmed
from hostdev.messages.bus.contract import DEAD_EXCHANGE, BusConfig, body_id
from hostdev.messages.bus.link import Stopped
from hostdev.messages.bus.rpc import RpcClient
from hostdev.messages.bus.wire import Delivery, Outgoing
from hostdev.messages.errors import BusError

log = structlog.get_logger()

_ACK_BATCH = 16  # deliveries settled between two (multiple) acks while more are waiting
_CLOSE_ERRORS: tuple[type[BaseException], ...] = (BusError, Stopped, *RECOVERABLE)


class AmqpLink(AmqpConnection):
    """The link contract on one RabbitMQ connection (see ``link.Link``)."""

    recoverable = RECOVERABLE

    def __init__(self, config: BusConfig) -> None:
        super().__init__(config)
        self._rpc: RpcClient | None = None
        self._rpc_lock = threading.Lock()
        self._since_flush = 0
        self._next_heartbeat_check = 0.0

    def clock(self) -> float:
        """Returns ``time.monotonic()``: timers run on real time."""
        return time.monotonic()

    def close(self) -> None:
        """Waits up to 5 s for outstanding confirms and acks, then closes every connection."""
        if self.usable:
            try:
                self.await_confirms(5.0)
            except _CLOSE_ERRORS as exc:
                log.warning("bus_close_unconfirmed", error=str(exc), unconfirmed=len(self.window))
        close_quietly(self.conn)
        self.conn = self.pub = self.sub = None
        with self._rpc_lock:
            if self._rpc is not None:
                self._rpc.close()
                self._rpc = None
        self.pipe.close()

    def take(self) -> Delivery | None:
        """Returns the next delivery received; checks heartbeats at most once a second."""
        conn = self.conn
        if conn is None or self.broken:
            raise Broken()
        now = time.monotonic()
        if now >= self._next_heartbeat_check:
            self._next_heartbeat_check = now + 1.0
            conn.heartbeat_check(rate=2)  # type: ignore[no-untyped-call]
        if not self.inbox:
            return None
        epoch, message, queue = self.inbox.popleft()
        props = message.properties
        info = message.delivery_info
        return Delivery(body=message.body, properties=props,
                        headers=dict(props.get("application_headers") or {}),
                        routing_key=info["routing_key"], redelivered=bool(info["redelivered"]),
                        queue=queue, token=(epoch, message))

    def wait(self, timeout: float) -> None:
        """Reads what the broker sends for up to ``timeout`` (shorter with heartbeats on)."""
        if self.conn is None or self.broken:
            raise Broken()
        cap = min(1.0, self.config.heartbeat / 4) if self.config.heartbeat else 1.0
        self.pump(min(timeout, cap))

    def wake(self) -> None:
        """Makes a wait() in the loop thread return; callable from any thread."""
        self.pipe.wake()

    def is_current(self, delivery: Delivery) -> bool:
        """Tells whether ``delivery`` came on the connection in use."""
        return bool(delivery.token[0] == self.epoch)

    def ack(self, delivery: Delivery) -> None:
        """Acks ``delivery`` once everything published so far is confirmed.

        The ack goes out with the batch: after ``_ACK_BATCH`` settled
        deliveries or when none is waiting, as one ``multiple`` ack.
        """
        epoch, message = delivery.token
        if epoch == self.epoch:
            self.window.defer((epoch, message.delivery_info["delivery_tag"]))
        self._settled()

    def requeue(self, delivery: Delivery) -> None:
        """Rejects ``delivery`` with requeue (if its connection is still the current one)."""
        epoch, message = delivery.token
        if epoch == self.epoch and self.sub is not None:
            self.sub.basic_reject(message.delivery_info["delivery_tag"], requeue=True)
        self._settled()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Publishes a copy of ``delivery`` to hostdev.dead, confirmed before its ack."""
        message = delivery.token[1]
        mid = delivery.properties.get("message_id") or body_id(delivery.body)
        self.send_item(Unconfirmed(DEAD_EXCHANGE, delivery.queue, dead_letter_copy(
            message, queue=delivery.queue, reason=reason, user_id=self.user_id), False, mid))

    def reject(self, delivery: Delivery, reason: str) -> None:
        """Rejects ``delivery`` without requeue: the broker dead-letters it (``x-death``)."""
        epoch, message = delivery.token
        if epoch == self.epoch and self.sub is not None:
            self.sub.basic_reject(message.delivery_info["delivery_tag"], requeue=False)
        log.info("message_rejected", message_id=delivery.properties.get("message_id"),
                 queue=delivery.queue)  # the reason was logged with message_dead_lettered
        self._settled()

    def flush(self) -> None:
        """Sends the acks that are ready; a dead connection's acks are moot."""
        if self.usable:
            with contextlib.suppress(*RECOVERABLE):
                self.flush_acks()

    def _settled(self) -> None:
        self._since_flush += 1
        if self.usable and (not self.inbox or self._since_flush >= _ACK_BATCH):
            self._since_flush = 0
            self.flush_acks()
            if not self.inbox:
                self.pump(0.0)

    def send(self, outgoing: Outgoing) -> None:
        """Publishes ``outgoing``, blocking only while the confirm window is full; reconnects."""
        self.send_item(Unconfirmed(outgoing.exchange, outgoing.routing_key, to_amqp(outgoing),
                                   outgoing.mandatory, outgoing.message_id,
                                   republish=outgoing.republish,
                                   on_confirmed=outgoing.on_confirmed))

    def wait_confirms(self, timeout: float) -> None:
        """Returns once every publish so far is confirmed (reconnecting if needed).

        Raises:
            BusError: not all confirmed within ``timeout``, or some refused repeatedly.
        """
        try:
            self.await_confirms(timeout)
        except Stopped:
            raise BusError("bus stopped before all publishes were confirmed") from None
        if self.abandoned:
            ids, self.abandoned = self.abandoned, []
            raise BusError(f"the broker refused {len(ids)} publish(es) repeatedly: {ids[:10]}; "
                           "see the bus_publish_abandoned log lines")

    def request(self, message: Message, timeout: float) -> Message:
        """Sends an API request over direct reply-to on a connection of its own; any thread."""
        with self._rpc_lock:
            if self._rpc is None:
                self._rpc = RpcClient(self.config, self.urls, self.user_id)
            return self._rpc.call(message, timeout=timeout)
