"""The AMQP pieces the bus is built from: connecting, topology, message properties.

Connections come from kombu (URL parsing, TLS, heartbeats); everything after
that talks to the py-amqp channel under kombu, because kombu's
``confirm_publish`` waits for each confirm in turn and cannot keep a window of
confirms in flight (see ``amqp_link.py``).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
from collections.abc import Sequence

import amqp
import amqp.exceptions
from amqp import spec
from amqp.exceptions import UnexpectedFrame
from amqp.serialization import dumps
from amqp.transport import TCPTransport
from kombu.connection import Connection as KombuConnection

from hostdev.messages.bus.contract import (
    COMMANDS_EXCHANGE,
    DEAD_EXCHANGE,
    DEAD_LETTERED_BY_HEADER,
    DEAD_QUEUE,
    DROPPED_DEAD_LETTER_HEADERS,
    EVENTS_EXCHANGE,
    REASON_HEADER,
    BusConfig,
    capped,
    queue_arguments,
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

# A frame is a 7-octet header (type, channel, payload size), the payload and an end octet.
_FRAME_HEADER = 7
_FRAME_START = struct.Struct(">BH")  # type, channel
_FRAME_SIZE = struct.Struct(">I")  # the payload size, at offset 3
_FRAME_END = 0xCE
# Bytes read per recv(): a few dozen small deliveries. What is left of the buffer
# is copied after each frame cut from it, so much more costs more.
_RECV_CHUNK = 8192
# The most read at once, whatever size a frame header claims (frames are at most
# the negotiated frame_max, 128 kB by default).
_RECV_MOST = 1 << 18
# The most bytes of a sender's own headers a dead letter keeps: with hostdev's
# (a capped reason and a few names) they stay well inside one content-header
# frame (RabbitMQ's frame_max is 128 kB by default).
_KEPT_HEADERS = 64 * 1024


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


def publish(channel: amqp.Channel, message: amqp.Message, exchange: str, routing_key: str,
            *, mandatory: bool) -> None:
    """Sends ``basic.publish`` with ``message``, as ``Channel.basic_publish`` does.

    Without its first step: on a connection that negotiated ``connection.blocked``
    (all of ours), py-amqp reads one pending event, switching the socket's timeout
    twice, before every publish. The bus reads what the broker sends in its own
    loop (``pump``), where a ``connection.blocked`` is handled like any event.

    Raises:
        amqp.exceptions.RecoverableConnectionError: the channel's connection is closed.
    """
    channel.send_method(spec.Basic.Publish, "Bssbb",
                        (0, exchange, routing_key, mandatory, False), message)


def dead_letter_copy(raw_message: amqp.Message, *, queue: str, reason: str,
                     user_id: str) -> amqp.Message:
    """Returns a copy of a consumed message for hostdev.dead, with the reason in its headers.

    The sender's ``user_id`` moves to a header (the broker only accepts our own
    login in the property), ``user_id`` and ``x-hostdev-dead-lettered-by`` name
    our own login, and ``expiration`` is dropped so the copy stays. The
    sender's own ``x-hostdev-*`` and ``x-death`` headers are dropped (they
    would pass for ours or the broker's), its other headers kept up to 64 kB,
    and the reason is capped: the copy always fits in the broker's frame.
    """
    props = dict(raw_message.properties)
    headers = {key: value for key, value
               in (props.pop("application_headers", None) or {}).items()
               if not key.startswith(DROPPED_DEAD_LETTER_HEADERS)}
    if headers and len(dumps("F", [headers])) > _KEPT_HEADERS:
        headers = {"x-hostdev-headers-dropped": f"over {_KEPT_HEADERS} bytes"}
    info = getattr(raw_message, "delivery_info", None) or {}
    headers[REASON_HEADER] = capped(reason)
    headers["x-hostdev-queue"] = queue
    headers["x-hostdev-exchange"] = info.get("exchange", "")
    headers["x-hostdev-routing-key"] = info.get("routing_key", "")
    headers[DEAD_LETTERED_BY_HEADER] = user_id
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
    buffered = getattr(conn.transport, "_read_buffer", b"")
    if len(buffered) >= _frame_length(buffered) > 0:
        return True  # read by drain_ready() already, not parsed yet (it stopped at its limit)
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
    """Processes the frames already received, without blocking; returns how many methods.

    py-amqp reads each frame with three ``recv()`` calls and sets the socket's
    timeout twice around each (about twenty system calls per delivered
    message). On a plain TCP connection the bytes waiting are read in chunks
    into py-amqp's own read buffer instead, and each whole frame is cut from
    it and handed to py-amqp's frame handler, as ``blocking_read`` would. The
    rest stays in that buffer before the frame is handled, so a read py-amqp
    makes itself meanwhile continues from the next frame. TLS connections, and
    sockets with a timeout of their own, take py-amqp's usual path.

    Raises:
        ConnectionError: the broker closed the connection.
        amqp.exceptions.UnexpectedFrame: a frame does not end as AMQP requires.
    """
    transport = conn.transport
    sock = transport.sock
    if not isinstance(transport, TCPTransport) or sock.gettimeout() is not None:
        return _drain_each(conn, limit)
    on_frame = conn.on_inbound_frame
    done = 0
    while done < limit:
        buffered = transport._read_buffer
        end = _frame_length(buffered)
        if not end or len(buffered) < end:
            # The rest of a large frame at once: appending chunk after chunk to
            # the buffer would copy it over and over.
            want = min(max(_RECV_CHUNK, end - len(buffered)), _RECV_MOST)
            try:
                chunk = sock.recv(want, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            transport._read_buffer = buffered + chunk
            continue
        if buffered[end - 1] != _FRAME_END:
            raise UnexpectedFrame(f"frame end {buffered[end - 1]:#04x}, expected 0xce")
        kind, channel = _FRAME_START.unpack_from(buffered)
        transport._read_buffer = buffered[end:]
        if on_frame((kind, channel, buffered[_FRAME_HEADER:end - 1])):
            done += 1  # a method is complete (content methods take three frames)
    return done


def _frame_length(buffered: bytes) -> int:
    """Returns the length of the frame ``buffered`` starts with, or 0 before its header is in."""
    if len(buffered) < _FRAME_HEADER:
        return 0
    size: int = _FRAME_SIZE.unpack_from(buffered, 3)[0]
    return _FRAME_HEADER + size + 1


def _drain_each(conn: amqp.Connection, limit: int) -> int:
    done = 0
    while done < limit:
        try:
            conn.drain_events(timeout=0)
        except TimeoutError:
            break
        done += 1
    return done
