"""Request/response over RabbitMQ direct reply-to, on a connection of its own.

A request goes to ``hostdev.commands`` with routing key ``api.<Type>``,
``reply_to=amq.rabbitmq.reply-to`` and ``expiration`` = the timeout (an
unserved request expires into ``hostdev.dead`` rather than being answered
long after its caller gave up). The answer's ``correlation_id`` is the
request's ``message_id``; stale answers of earlier, timed-out requests are
discarded. A lost connection is re-opened and the request re-sent with the
same ``message_id`` until the deadline (API handlers are idempotent by it).
The broker confirms each publish: one not confirmed within ``CONFIRM_WAIT_S``
counts as a lost connection too (a channel opened while a clustered broker
elects the queue's new leader can swallow publishes without an error). A
request that lived through a lost connection is re-sent every
``RESEND_AFTER_LOSS_S`` until answered: while a cluster elects new leaders its
consumers drop and come back several times, each return counts as a
delivery, and the broker may dead-letter a copy past the delivery limit.
"""

from __future__ import annotations

import time

import amqp
import amqp.exceptions
import structlog
from kombu.connection import Connection as KombuConnection

from hostdev.messages.base import Message
from hostdev.messages.bus.amqp_message import (
    CONNECTION_ERRORS,
    close_quietly,
    drain_ready,
    new_channel,
    open_connection,
    publish,
    raw,
    to_amqp,
    wait_readable,
)
from hostdev.messages.bus.contract import COMMANDS_EXCHANGE, DIRECT_REPLY_TO, BusConfig, safe_url
from hostdev.messages.bus.failures import BrokerUnreachable, broker_failure
from hostdev.messages.bus.wire import decode_answer, new_outgoing
from hostdev.messages.errors import BusError, RequestTimeout
from hostdev.messages.runtime.backoff import Backoff

log = structlog.get_logger()

#: Spacing of attempts to connect while a request's deadline lasts.
_RETRY = Backoff(first_s=0.2, max_s=2.0)
#: How long a request's publish may wait for the broker's confirm before it is re-sent.
CONFIRM_WAIT_S = 5.0
#: After a lost connection, how often the request is re-sent until it is answered.
RESEND_AFTER_LOSS_S = 5.0


class Unconfirmed(Exception):
    """The broker did not confirm a request's publish in time; re-sent on a new connection."""


#: What makes a request be re-sent on a new connection (to the next URL).
_RESENT_AFTER: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, Unconfirmed)


class RpcClient:
    """One connection and channel for requests; not thread-safe (its owner holds a lock)."""

    def __init__(self, config: BusConfig, urls: list[str], user_id: str) -> None:
        self.config = config
        self._urls = urls
        self._url_index = 0
        self._user_id = user_id
        self._conn: KombuConnection | None = None
        self._channel: amqp.Channel | None = None
        self._waiting: str | None = None
        self._reply: amqp.Message | None = None
        self._returned: str | None = None
        self._confirmed = False
        self._nacked = False

    def close(self) -> None:
        """Closes the connection (a later call re-opens it)."""
        close_quietly(self._conn)
        self._conn = self._channel = None

    def call(self, message: Message, *, timeout: float) -> Message:
        """Sends ``message`` as a request and returns the typed answer (see Bus.request)."""
        name = type(message).__name__
        key = f"api.{name}"
        deadline = time.monotonic() + timeout
        outgoing = new_outgoing(message, exchange=COMMANDS_EXCHANGE, routing_key=key,
                                app_id=self.config.app_id, user_id=self._user_id,
                                reply_to=DIRECT_REPLY_TO, expiration_s=timeout)
        amqp_message, mid = to_amqp(outgoing), outgoing.message_id
        self._waiting, self._reply, self._returned = mid, None, None
        sent = False
        sent_at = 0.0
        resend = False  # set by a lost connection: re-send every RESEND_AFTER_LOSS_S
        failure: BrokerUnreachable | None = None  # the last failed connection attempt
        failures = 0
        published = False  # at least once: a lost connection clears ``sent``, not this
        try:
            while self._reply is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 and failure is not None and not published:
                    raise BrokerUnreachable(failure.url, f"{failure.cause}; {name} was not "
                                            "published", permanent=failure.permanent)
                if remaining <= 0:
                    raise RequestTimeout(
                        f"no answer to {name} (message_id {mid}) within {timeout:g} s: it was "
                        f"published to exchange {COMMANDS_EXCHANGE!r} with routing key {key!r} "
                        f"on {self.config.safe_url()}; is hostdev-mgmt running and consuming "
                        "queue 'hostdev.api'?")
                try:
                    if self._channel is None:
                        try:
                            self._open()
                        except CONNECTION_ERRORS as exc:
                            failure = broker_failure(self._safe_url(), exc)
                            if failure.permanent:  # retrying cannot help: say so at once
                                raise BrokerUnreachable(
                                    failure.url, f"{failure.cause}; {name} was not published",
                                    permanent=True) from None
                            raise
                        failure = None
                    assert self._conn is not None and self._channel is not None
                    if not sent:
                        self._confirmed = self._nacked = False
                        publish(self._channel, amqp_message, COMMANDS_EXCHANGE, key,
                                mandatory=True)
                        sent = published = True
                        sent_at = time.monotonic()
                    conn = raw(self._conn)
                    if wait_readable(conn, None, min(remaining, 1.0)):
                        drain_ready(conn)
                    if self._nacked:
                        raise Unconfirmed(f"{name} refused by the broker (basic.nack)")
                    if not self._confirmed and time.monotonic() - sent_at > CONFIRM_WAIT_S:
                        raise Unconfirmed(f"{name} not confirmed within {CONFIRM_WAIT_S:g} s")
                    if resend and time.monotonic() - sent_at > RESEND_AFTER_LOSS_S:
                        sent = False  # the copy may have been dead-lettered: another one
                except (amqp.exceptions.NotFound, amqp.exceptions.AccessRefused) as exc:
                    self.close()
                    raise BusError(
                        f"{name} cannot be sent to exchange {COMMANDS_EXCHANGE!r} on "
                        f"{self.config.safe_url()}: {exc.reply_text}; the exchange must exist "
                        "(start hostdev-mgmt once) and the user may write to it") from exc
                except _RESENT_AFTER as exc:
                    self.close()
                    self._url_index += 1
                    sent = False  # direct reply-to is bound to the lost channel: re-send
                    resend = published
                    if failure is None:
                        log.warning("request_connection_lost", error=repr(exc), message_id=mid)
                    else:  # not even connected: back off, within the deadline
                        failures += 1
                        time.sleep(min(max(0.0, deadline - time.monotonic()),
                                       _RETRY.delay(failures - 1)))
                if self._returned is not None:
                    raise BusError(
                        f"{name} (message_id {mid}) cannot be delivered: no queue is bound to "
                        f"routing key {key!r} on exchange {COMMANDS_EXCHANGE!r} at "
                        f"{self.config.safe_url()} ({self._returned}); start hostdev-mgmt once "
                        "so it declares queue 'hostdev.api'")
        finally:
            self._waiting = None
        return decode_answer(self._reply.body, name, mid)

    def _safe_url(self) -> str:
        return safe_url(self._urls[self._url_index % len(self._urls)])

    def _open(self) -> None:
        url = self._urls[self._url_index % len(self._urls)]
        # No heartbeats: the connection idles between calls, and a call has its own timeout.
        conn = open_connection(url, self.config, heartbeat=0)
        try:
            channel = new_channel(conn)
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)
            channel.basic_consume(DIRECT_REPLY_TO, no_ack=True, callback=self._on_reply)
        except BaseException:
            close_quietly(conn)
            raise
        self._conn, self._channel = conn, channel

    def _on_reply(self, message: amqp.Message) -> None:
        correlation_id = message.properties.get("correlation_id")
        if self._waiting is not None and correlation_id == self._waiting:
            self._reply = message
        else:
            log.info("stale_answer_discarded", correlation_id=correlation_id)

    def _on_ack(self, _tag: int, _multiple: bool) -> None:
        self._confirmed = True  # one publish in flight at a time: any ack is its ack

    def _on_nack(self, _tag: int, _multiple: bool) -> None:
        self._nacked = True  # re-sent on a new connection, like a lost one

    def _on_return(self, exc: Exception, exchange: str, routing_key: str,
                   message: amqp.Message) -> None:
        if message.properties.get("message_id") == self._waiting:
            self._returned = str(exc)
