"""The connection to RabbitMQ under the AMQP link: channels, confirms, deliveries, recovery.

:class:`AmqpConnection` owns one kombu connection with two py-amqp channels:
one in confirm mode for publishing and declaring, one for consuming. It keeps
every unconfirmed publish (``ConfirmWindow``) and republishes them after a
nack or a reconnect, holds back acks until the confirms they depend on, and
reconnects with exponential backoff and full jitter. Deliveries are queued in
:attr:`AmqpConnection.inbox` tagged with the connection's epoch, so a delivery
of a dead connection is never acked on a new one. ``amqp_link.AmqpLink``
builds the link contract on it; everything runs on the loop thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import amqp
import amqp.exceptions
import structlog
from kombu.connection import Connection as KombuConnection

from hostdev.messages.bus.amqp_message import (
    CONNECTION_ERRORS,
    close_quietly,
    dead_letter_copy,
    declare_queue,
    declare_topology,
    drain_ready,
    new_channel,
    open_connection,
    publish,
    raw,
    wait_readable,
)
from hostdev.messages.bus.confirms import ConfirmWindow, Unconfirmed
from hostdev.messages.bus.contract import (
    DEAD_EXCHANGE,
    BusConfig,
    publishes_dead_letters,
    safe_url,
)
from hostdev.messages.bus.failures import BrokerUnreachable, broker_failure
from hostdev.messages.bus.link import Stopped
from hostdev.messages.bus.loop import WakePipe
from hostdev.messages.errors import BusError
from hostdev.messages.runtime.backoff import Backoff
from hostdev.messages.runtime.metrics import bus_reconnected

log = structlog.get_logger()

_MAX_REPUBLISH = 3  # a publish refused or lost this many times is abandoned (poison reply_to)


class Broken(Exception):
    """The connection was torn down and must be re-established before use."""


RECOVERABLE: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, Broken)


class AmqpConnection:
    """One connection, its channels and the publishes/deliveries in flight on it."""

    def __init__(self, config: BusConfig) -> None:
        self.config = config
        self.urls = [u.strip() for u in config.url.split(";") if u.strip()]
        self.url_index = 0
        self.conn: KombuConnection | None = None
        self.pub: amqp.Channel | None = None
        self.sub: amqp.Channel | None = None
        self.broken = False
        self.epoch = 0
        self.user_id = config.login_user()
        self.window = ConfirmWindow()
        # Full jitter: each wait is uniform in [0, min(max, 0.2 s * 2**n)].
        self._backoff = Backoff(first_s=min(0.2, config.reconnect_max_s),
                                max_s=config.reconnect_max_s, jitter=1.0)
        self.abandoned: list[str] = []
        self.queues: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.consumed: list[str] = []
        self.inbox: deque[tuple[int, amqp.Message, str]] = deque()
        self.pipe = WakePipe()
        #: Set when the loop is asked to stop: a reconnect in progress gives up.
        self.stopping = threading.Event()
        self._reconnect_callbacks: list[Callable[[], None]] = []
        self._returned: list[tuple[amqp.Message, str]] = []
        self._opened_at = 0.0
        self._flaps = 0

    @property
    def connected(self) -> bool:
        """True once connected (even if the connection broke since and awaits recovery)."""
        return self.conn is not None

    @property
    def publishes_dead_letters(self) -> bool:
        """False for an agent's user (``agent-<guid>``): it may not write to hostdev.dead.

        Its broker permissions (``hostdev-mgmt rabbitmq-user add``) refuse it,
        so no dead letter can claim to come from elsewhere; the broker
        dead-letters what it rejects instead.
        """
        return publishes_dead_letters(self.user_id)

    @property
    def usable(self) -> bool:
        """True when connected and not torn down."""
        return self.conn is not None and not self.broken

    def url(self) -> str:
        """Returns the URL in use (or to try next), password masked."""
        return safe_url(self.urls[self.url_index % len(self.urls)])

    def connect(self) -> None:
        """Tries each failover URL once, unless already connected.

        Raises:
            BrokerUnreachable: none answered; one line naming each URL and its cause.
        """
        if self.usable:
            return
        if self.conn is not None:
            self.teardown()  # a broken connection is replaced, not leaked
        errors = []
        for _ in self.urls:
            try:
                self.open()
                return
            except CONNECTION_ERRORS as exc:
                errors.append(broker_failure(self.url(), exc))
                self.teardown()
                self.url_index += 1
        if len(errors) == 1:
            raise errors[0]
        raise BrokerUnreachable(self.config.safe_url(),
                                "; ".join(f"{e.url}: {e.cause}" for e in errors),
                                permanent=all(e.permanent for e in errors))

    def open(self) -> None:
        """Connects, declares everything, consumes every queue, republishes unconfirmed."""
        conn = open_connection(self.urls[self.url_index % len(self.urls)], self.config)
        self.conn = conn
        login = str(conn.userid)
        if self.config.user_id is not None and self.config.user_id != login:
            raise BusError(f"BusConfig.user_id {self.config.user_id!r} differs from the login "
                           f"{login!r}; the broker would refuse every publish")
        self.user_id = login
        pub = new_channel(conn)
        pub.confirm_select()
        pub.events["basic_ack"].add(self._on_ack)
        pub.events["basic_nack"].add(self._on_nack)
        pub.events["basic_return"].add(self._on_return)
        declare_topology(conn, pub, self.config)
        for name, (exchange, bindings) in self.queues.items():
            declare_queue(pub, self.config, name, exchange, bindings)
        sub = new_channel(conn)
        sub.basic_qos(0, self.config.prefetch, False)
        self.pub, self.sub = pub, sub
        self.broken = False
        for queue in self.consumed:
            self.start_consumer(queue)
        for item in self.window.reset():
            if not item.republish:
                log.info("answer_not_republished", message_id=item.message_id,
                         routing_key=item.routing_key)
                continue
            item.nacks += 1
            if item.nacks > _MAX_REPUBLISH:
                self._abandon(item, "lost with several connections")
                continue
            publish(pub, item.message, item.exchange, item.routing_key,
                    mandatory=item.mandatory)
            self.window.published(item)
        self._opened_at = time.monotonic()
        log.info("bus_connected", url=self.url(), epoch=self.epoch,
                 republished=len(self.window))

    def teardown(self) -> None:
        """Drops the connection; its unacked deliveries will be redelivered by the broker."""
        close_quietly(self.conn)
        self.conn = self.pub = self.sub = None
        self.broken = True
        self.epoch += 1
        self.inbox.clear()

    def recover(self, error: BaseException, stopping: threading.Event) -> None:
        """Reconnects with exponential backoff and full jitter until it works or ``stopping``.

        Raises:
            Stopped: ``stopping`` was set meanwhile.
        """
        self.stopping = stopping
        log.warning("bus_connection_lost", error=repr(error), url=self.url())
        self.teardown()
        # A connection that dies right after opening is flapping: back off too.
        self._flaps = self._flaps + 1 if time.monotonic() - self._opened_at < 5.0 else 0
        if self._flaps:
            stopping.wait(self._backoff.delay(self._flaps))
        attempt = 0
        while True:
            if stopping.is_set():
                raise Stopped()
            try:
                self.open()
                break
            except CONNECTION_ERRORS as exc:
                attempt += 1
                self.teardown()
                self.url_index += 1
                delay = self._backoff.delay(attempt)
                log.warning("bus_reconnect_failed", error=repr(exc), attempt=attempt,
                            retry_in_s=round(delay, 2))
                stopping.wait(delay)
        log.info("bus_reconnected", attempts=attempt + 1)
        bus_reconnected()
        for fn in self._reconnect_callbacks:
            fn()

    def on_reconnect(self, fn: Callable[[], None]) -> None:
        """Calls ``fn`` (in the loop thread) after every re-established connection."""
        self._reconnect_callbacks.append(fn)

    def declare(self, queue: str, exchange: str, bindings: tuple[str, ...]) -> None:
        """Declares a queue now (if connected) and after every reconnect."""
        self.queues[queue] = (exchange, bindings)
        if self.usable:
            assert self.pub is not None
            declare_queue(self.pub, self.config, queue, exchange, bindings)

    def consume(self, queue: str) -> None:
        """Consumes ``queue`` now (if connected) and after every reconnect."""
        if queue in self.consumed:
            return
        if self.usable:
            try:
                self.start_consumer(queue)
            except amqp.exceptions.NotFound as exc:
                self.broken = True  # the broker closed the consumer channel
                raise BusError(f"cannot consume queue {queue!r}: it does not exist on "
                               f"{self.url()}; declare it first (declare_queue, "
                               "declare_agent_queue or declare_mgmt_queues)") from exc
        self.consumed.append(queue)

    def start_consumer(self, queue: str) -> None:
        """Starts a consumer whose deliveries land in :attr:`inbox`."""
        assert self.sub is not None
        epoch, inbox = self.epoch, self.inbox

        def deliver(message: amqp.Message) -> None:
            inbox.append((epoch, message, queue))

        self.sub.basic_consume(queue, callback=deliver, on_cancel=self._on_cancel)

    def _on_cancel(self, consumer_tag: str) -> None:
        # The broker cancels a consumer whose queue was deleted: reconnecting
        # re-declares the queue and consumes it again.
        log.warning("bus_consumer_cancelled", consumer_tag=consumer_tag)
        self.broken = True

    def flush_acks(self) -> None:
        """Sends the acks whose publishes are all confirmed, as one ``multiple`` ack.

        Deliveries are handled and deferred in tag order and every earlier one
        is settled (acked, rejected or deferred ahead of it), so acking the
        highest ready tag with ``multiple`` acks exactly the ready ones.
        """
        ready = self.window.ready()
        if not ready or self.sub is None:
            return
        current = [tag for epoch, tag in ready if epoch == self.epoch]
        if current:
            self.sub.basic_ack(max(current), multiple=True)

    def send_item(self, item: Unconfirmed) -> None:
        """Publishes ``item``, blocking only while the confirm window is full; reconnects."""
        while True:
            if self.conn is None:
                raise BusError("publish before Bus.connect(); connect first")
            try:
                if self.broken:
                    raise Broken()
                while len(self.window) >= self.config.confirm_window:
                    self.pump(self.config.heartbeat or 5.0)
                assert self.pub is not None
                publish(self.pub, item.message, item.exchange, item.routing_key,
                        mandatory=item.mandatory)
                self.window.published(item)
                return
            except RECOVERABLE as exc:
                self.recover(exc, self.stopping)

    def await_confirms(self, timeout: float) -> None:
        """Returns once nothing is unconfirmed (reconnecting and republishing as needed).

        Raises:
            BusError: still unconfirmed after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while len(self.window) or self._returned:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BusError(f"{len(self.window)} publish(es) not confirmed by the broker "
                               f"within {timeout:g} s ({self.url()})")
            try:
                if self.broken:
                    raise Broken()
                self.pump(min(remaining, 1.0))
            except RECOVERABLE as exc:
                self.recover(exc, self.stopping)
        self.flush_acks()

    def pump(self, timeout: float) -> None:
        """Reads what the broker sent (waiting up to ``timeout``), then settles confirms."""
        assert self.conn is not None
        conn = raw(self.conn)
        if timeout > 0:
            readable = wait_readable(conn, self.pipe.fd, timeout)
            self.pipe.clear()
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
                if not self.publishes_dead_letters:
                    continue  # the log line is all an agent's user may leave
                copy = dead_letter_copy(message, queue="", reason=reason, user_id=self.user_id)
                self.send_item(Unconfirmed(DEAD_EXCHANGE, "", copy, False,
                                      str(message.properties.get("message_id"))))
            self.window.hold_back_deferred()
        self.flush_acks()

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self.window.acked(tag, multiple)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        for item in self.window.nacked(tag, multiple):
            item.nacks += 1
            if item.nacks > _MAX_REPUBLISH:
                self._abandon(item, "refused by the broker repeatedly")
                continue
            log.warning("bus_publish_nacked", message_id=item.message_id, nacks=item.nacks)
            assert self.pub is not None
            publish(self.pub, item.message, item.exchange, item.routing_key,
                    mandatory=item.mandatory)
            self.window.published(item)
        self.window.hold_back_deferred()

    def _on_return(self, exc: Exception, exchange: str, routing_key: str,
                   message: amqp.Message) -> None:
        reason = (f"unroutable: no queue is bound to routing key {routing_key!r} on exchange "
                  f"{exchange!r} ({exc}); is the receiver's queue declared?")
        message.delivery_info = {"exchange": exchange, "routing_key": routing_key}
        self._returned.append((message, reason))

    def _abandon(self, item: Unconfirmed, why: str) -> None:
        log.error("bus_publish_abandoned", message_id=item.message_id, exchange=item.exchange,
                  routing_key=item.routing_key, reason=why)
        self.abandoned.append(item.message_id)
