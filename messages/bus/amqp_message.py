"""The AMQP pieces the bus is built from: connecting, topology, message properties.

Connections come from kombu (URL parsing, TLS, heartbeats); everything after
that talks to the py-amqp channel under kombu, because kombu's
``confirm_publish`` waits for each confirm in turn and cannot keep a window of
confirms in flight (see ``amqp_link.py``).
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import Sequence
from typing import Any

import amqp
import amqp.exceptions
from kombu.connection import Connection as KombuConnection

from hostdev.messages.bus.contract import (
    COMMANDS_EXCHANGE,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    EVENTS_EXCHANGE,
    REASON_HEADER,
    BusConfig,
)
from hostdev.messages.bus.failures import check_scheme
from hostdev.messages.bus.wire import Outgoing
from hostdev.messages.errors import BusError

#: Errors after which the connection is unusable and must be re-established.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    amqp.exceptions.ConnectionError,
    amqp.exceptions.RecoverableConnectionError,
    amqp.exceptions.ChannelError,  # a closed channel: we reopen everything
    OSError,
    ConnectionError,
)


def open_connection(url: str, config: BusConfig, *, heartbeat: float | None = None
                    ) -> KombuConnection:
    """Opens one kombu connection to one URL (no retry; the caller backs off).

    Raises:
        OSError, amqp.exceptions.AMQPError: the broker refused or did not answer.
        BrokerUnreachable: the URL is not an AMQP URL.
    """
    check_scheme(url)  # kombu would fail on another scheme with a bare KeyError
    conn = KombuConnection(  # type: ignore[no-untyped-call]

        url,
        heartbeat=config.heartbeat if heartbeat is None else heartbeat,
        connect_timeout=config.connect_timeout,
        transport_options={"client_properties": {"connection_name": config.app_id}},
    )
    try:
        conn.connect()  # type: ignore[no-untyped-call]
    except BaseException:
        close_quietly(conn)
        raise
    return conn


def close_quietly(conn: KombuConnection | None) -> None:
    """Closes a connection that may already be dead, ignoring every error."""
    if conn is None:
        return
    try:
        conn.close()  # type: ignore[no-untyped-call]
    except Exception:
        with contextlib.suppress(Exception):
            conn.collect()  # type: ignore[no-untyped-call]


def raw(conn: KombuConnection) -> amqp.Connection:
    """Returns the py-amqp connection under kombu."""
    return conn.connection


def new_channel(conn: KombuConnection) -> amqp.Channel:
    """Opens a channel: kombu's py-amqp channel, used directly for windowed confirms."""
    return conn.channel()  # type: ignore[no-untyped-call]


def queue_arguments(config: BusConfig, *, dead_letter: bool = True) -> dict[str, Any]:
    """Returns the x-arguments of a hostdev queue for the configured queue type."""
    args: dict[str, Any] = {"x-queue-type": config.queue_type}
    if dead_letter:
        args["x-dead-letter-exchange"] = DEAD_EXCHANGE
        if config.queue_type == "quorum":
            args["x-delivery-limit"] = config.delivery_limit
    return args


def declare_topology(conn: KombuConnection, channel: amqp.Channel, config: BusConfig) -> None:
    """Declares the exchanges and the dead-letter queue that do not exist yet (idempotent).

    Each is probed with a passive declare first, which needs no permission:
    an agent's broker user may configure only its own queue
    (``hostdev-mgmt rabbitmq-user add``), so it must not re-declare what the
    definitions or a management daemon created. ``hostdev.dead`` is shared by
    every daemon, whatever its ``queue_type``: it is created with the first
    declarer's type and used as it is after that.
    """
    for name, kind in ((COMMANDS_EXCHANGE, "topic"), (EVENTS_EXCHANGE, "topic"),
                       (DEAD_EXCHANGE, "fanout")):
        if not _exists(conn, "exchange", name):
            channel.exchange_declare(name, kind, durable=True, auto_delete=False)
    if not _exists(conn, "queue", DEAD_QUEUE):
        declare_queue(channel, config, DEAD_QUEUE, DEAD_EXCHANGE, [""], dead_letter=False)


def _exists(conn: KombuConnection, kind: str, name: str) -> bool:
    probe = new_channel(conn)  # a failed passive declare closes its channel
    try:
        if kind == "exchange":
            probe.exchange_declare(name, "topic", passive=True)
        else:
            probe.queue_declare(name, passive=True)
    except amqp.exceptions.NotFound:
        return False
    probe.close()
    return True


def declare_queue(channel: amqp.Channel, config: BusConfig, name: str, exchange: str,
                  bindings: Sequence[str], *, dead_letter: bool = True) -> None:
    """Declares a durable queue with its bindings.

    Raises:
        BusError: the queue exists with other arguments (type, delivery limit).
    """
    try:
        channel.queue_declare(name, durable=True, auto_delete=False, exclusive=False,
                              arguments=queue_arguments(config, dead_letter=dead_letter))
    except amqp.exceptions.PreconditionFailed as exc:
        raise BusError(
            f"queue {name!r} already exists with other arguments than "
            f"{queue_arguments(config, dead_letter=dead_letter)} ({exc.reply_text}); delete it "
            "(rabbitmqctl delete_queue) or set BusConfig.queue_type/delivery_limit to match"
        ) from exc
    for key in bindings:
        channel.queue_bind(name, exchange, key)


def to_amqp(outgoing: Outgoing) -> amqp.Message:
    """Returns the py-amqp message for ``outgoing``, with its headers and expiration."""
    props = dict(outgoing.properties)
    if outgoing.expiration_s is not None:
        props["expiration"] = str(max(0, int(outgoing.expiration_s * 1000)))
    if outgoing.headers:
        props["application_headers"] = dict(outgoing.headers)
    return amqp.Message(outgoing.body, **props)


def dead_letter_copy(raw_message: amqp.Message, *, queue: str, reason: str,
                     user_id: str) -> amqp.Message:
    """Returns a copy of a consumed message for hostdev.dead, with the reason in its headers.

    The sender's ``user_id`` moves to a header (the broker only accepts our own
    login in the property) and ``expiration`` is dropped so the copy stays.
    """
    props = dict(raw_message.properties)
    headers = dict(props.pop("application_headers", None) or {})
    info = getattr(raw_message, "delivery_info", None) or {}
    headers[REASON_HEADER] = reason
    headers["x-hostdev-queue"] = queue
    headers["x-hostdev-exchange"] = info.get("exchange", "")
    headers["x-hostdev-routing-key"] = info.get("routing_key", "")
    sender = props.pop("user_id", None)
    if sender:
        headers["x-hostdev-user-id"] = sender
    props.pop("expiration", None)
    props["user_id"] = user_id
    props["application_headers"] = headers
    props.setdefault("delivery_mode", 2)
    return amqp.Message(raw_message.body, **props)


def wait_readable(conn: amqp.Connection, wake_fd: int | None, timeout: float) -> bool:
    """Waits until the AMQP socket has data (or ``wake_fd`` is written); True if the socket does.

    Uses poll(), not select(), so file descriptors above 1023 work.
    """
    sock = conn.sock
    pending = getattr(sock, "pending", None)
    if pending is not None and pending():  # TLS: bytes already decrypted
        return True
    poller = select.poll()
    sock_fd = sock.fileno()
    poller.register(sock_fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    if wake_fd is not None:
        poller.register(wake_fd, select.POLLIN)
    events = poller.poll(max(0.0, timeout) * 1000.0)
    return any(fd == sock_fd for fd, _ in events)


def drain_ready(conn: amqp.Connection, limit: int = 1000) -> int:
    """Processes the frames already received, without blocking; returns how many methods."""
    done = 0
    while done < limit:
        try:
            conn.drain_events(timeout=0)
        except TimeoutError:
            break
        done += 1
    return done
