"""The bus contract daemons code against (no transport code here).

``Bus`` (RabbitMQ) and ``InProcessBus`` (in memory), both ``core.LinkBus``,
implement :class:`BusLike`; daemons code against it and import the names
below from ``hostdev.messages.bus``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from hostdev.messages.base import Message

#: Exchange of commands: ``agent.<guid>.<Type>``, ``mgmt.<guid>.<Type>``, ``api.<Type>``.
COMMANDS_EXCHANGE = "hostdev.commands"
#: Exchange of events: ``vm.<uuid>.<State>``, ``host.<guid>.<Status>`` ...
EVENTS_EXCHANGE = "hostdev.events"
#: Fanout exchange and queue of everything that could not be decoded or handled.
DEAD_EXCHANGE = "hostdev.dead"
DEAD_QUEUE = "hostdev.dead"
MGMT_QUEUE = "hostdev.mgmt"
API_QUEUE = "hostdev.api"
#: RabbitMQ's pseudo-queue for direct reply-to.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
#: Header naming why a message was dead-lettered by hostdev.
REASON_HEADER = "x-hostdev-reason"
#: Header naming the broker user of the daemon that dead-lettered a message; it
#: equals the copy's ``user_id`` property, which the broker validates.
DEAD_LETTERED_BY_HEADER = "x-hostdev-dead-lettered-by"
#: The prefix of the headers hostdev writes; a sender's own are dropped from a dead letter.
HOSTDEV_HEADER_PREFIX = "x-hostdev-"
#: The most bytes (UTF-8) of message content the bus puts in one header.
HEADER_LIMIT = 4096
#: Broker users of agents are ``agent-<guid>``; they may not publish to hostdev.dead.
AGENT_USER_PREFIX = "agent-"
#: The sender's headers a dead-letter copy drops: hostdev's own (the copy's
#: origin must not be forged) and the broker's death records.
DROPPED_DEAD_LETTER_HEADERS = (HOSTDEV_HEADER_PREFIX, "x-death", "x-first-death-",
                               "x-last-death-")
CONTENT_TYPE = "application/json"
#: The queue types hostdev declares its queues with (``amqp.queue.type``).
QUEUE_TYPES = ("quorum", "classic")
#: Exchanges hostdev publishes to ("" is the default exchange, for ``reply_to``).
KNOWN_EXCHANGES = frozenset({"", COMMANDS_EXCHANGE, EVENTS_EXCHANGE, DEAD_EXCHANGE})


@dataclass(frozen=True)
class BusConfig:
    """How to reach the broker and how to declare and use queues.

    Attributes:
        url: AMQP URL; several separated by ``;`` fail over round-robin.
        app_id: the AMQP ``app_id`` put on everything published.
        user_id: the AMQP ``user_id`` property (the broker checks it equals
            the login user); None derives it from the URL.
        queue_type: ``quorum`` (default) or ``classic``.
        delivery_limit: deliveries of one message before it is dead-lettered
            (quorum ``x-delivery-limit``, and the bus's own count for
            handlers that keep raising ``TransientError``).
        heartbeat: AMQP heartbeat in seconds (0 disables it).
        prefetch: unacked deliveries the broker may push to one consumer channel.
        confirm_window: publisher confirms in flight before ``publish()`` blocks.
        connect_timeout: seconds for one TCP/AMQP connection attempt.
        reconnect_max_s: the ceiling of the exponential reconnect backoff.
    """

    url: str = "amqp://guest:guest@127.0.0.1:5672//"
    app_id: str = "hostdev"
    user_id: str | None = None
    queue_type: str = "quorum"
    delivery_limit: int = 5
    heartbeat: float = 30.0
    prefetch: int = 50
    confirm_window: int = 100
    connect_timeout: float = 10.0
    reconnect_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.queue_type not in QUEUE_TYPES:
            raise ValueError(
                f"BusConfig.queue_type is {self.queue_type!r}; expected 'quorum' or 'classic'")
        if self.delivery_limit < 1 or self.prefetch < 1 or self.confirm_window < 1:
            raise ValueError(
                "BusConfig.delivery_limit, prefetch and confirm_window must be >= 1 "
                f"(got {self.delivery_limit}, {self.prefetch}, {self.confirm_window})")
        if self.reconnect_max_s <= 0:
            raise ValueError(
                f"BusConfig.reconnect_max_s is {self.reconnect_max_s}; expected seconds > 0")

    def login_user(self) -> str:
        """Returns the ``user_id`` to stamp: the configured one or the first URL's login."""
        if self.user_id is not None:
            return self.user_id
        return user_from_url(self.url)

    def safe_url(self) -> str:
        """Returns the URL(s) with passwords masked, for logs and error texts."""
        return ";".join(safe_url(url) for url in self.url.split(";"))


def capped(text: str, limit: int = HEADER_LIMIT) -> str:
    """Returns ``text`` cut to at most ``limit`` bytes of UTF-8, marked as cut when it is.

    Every header the bus builds from message content (a dead letter's reason
    quotes fields and exception texts) goes through here: a header larger than
    the broker's frame limit would cost the connection, and with it every
    message delivered on it.
    """
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    mark = f" ...[cut: {len(data)} bytes in all]"
    return data[:limit - len(mark)].decode("utf-8", "ignore") + mark


def user_from_url(url: str) -> str:
    """Returns the login user of the first URL in ``url`` (``guest`` when it names none)."""
    first = url.split(";")[0].strip()
    user = urlsplit(first).username
    return unquote(user) if user else "guest"


def safe_url(url: str) -> str:
    """Returns one URL with its password masked, for logs and error texts."""
    parts = urlsplit(url.strip())
    if parts.password is None:
        return url.strip()
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def publishes_dead_letters(user_id: str) -> bool:
    """Tells whether a bus logged in as ``user_id`` may publish to hostdev.dead.

    An agent's user (``agent-<guid>``) may not: its broker permissions refuse
    it, so its bus rejects and the broker dead-letters instead.
    """
    return not user_id.startswith(AGENT_USER_PREFIX)


@dataclass(frozen=True)
class Incoming:
    """What a handler gets besides the typed message: the delivery's AMQP facts.

    Attributes:
        message_id: the sender's id, None when it set none; handlers MUST be
            idempotent by it, since delivery is at-least-once (a redelivery
            repeats the id). A message without an id is handled at each delivery.
        correlation_id: on an answer, the ``message_id`` of its command.
        reply_to: where an answer goes (direct reply-to for API calls).
        user_id: the broker-validated login of the sender (None if unset).
        routing_key: the key the message was published with.
        redelivered: the broker delivered it before (maybe handled already).
        headers: AMQP headers (``x-delivery-count`` on quorum redeliveries).
        queue: the queue it was consumed from.
    """

    message_id: str | None
    correlation_id: str | None
    reply_to: str | None
    user_id: str | None
    routing_key: str
    redelivered: bool
    headers: dict[str, Any] = field(default_factory=dict)
    queue: str = ""


#: A handler gets the typed message (declared as ``Any`` so a handler may be
#: typed with its concrete message class) and returns an answer or None.
Handler = Callable[[Any, Incoming], "Message | None"]

#: A batch handler gets a run of deliveries of its type, in the order taken, and
#: returns one result per delivery, in the same order: the answer (or None), or
#: the exception handling that one delivery raised (judged as a handler's).
BatchHandler = Callable[[Sequence[tuple[Any, Incoming]]], Sequence["Message | Exception | None"]]


@dataclass(frozen=True)
class Batching:
    """How a consumer handles one message type in batches.

    The bus collects consecutive deliveries of the type (a delivery of another
    type ends the run, so the order of a queue is kept; types given the SAME
    ``Batching`` object share runs) and hands them over
    when ``max_size`` are collected or ``linger_s`` after the first, whichever
    comes first. Deliveries are settled one by one, as if handled alone.

    Attributes:
        handler: handles one run (see :data:`BatchHandler`).
        max_size: the most deliveries in one run; keep it at most the
            consumer's prefetch, or a run waits for ``linger_s``.
        linger_s: the longest a delivery waits for others before its run is handled.
    """

    handler: BatchHandler
    max_size: int = 50
    linger_s: float = 0.1

    def __post_init__(self) -> None:
        if self.max_size < 1 or self.linger_s < 0:
            raise ValueError(f"Batching needs max_size >= 1 and linger_s >= 0 "
                             f"(got {self.max_size}, {self.linger_s})")


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Tells whether an AMQP topic binding (``*`` one word, ``#`` zero or more) matches a key."""
    return _match(pattern.split("."), routing_key.split("."))


def _match(pat: list[str], key: list[str]) -> bool:
    if not pat:
        return not key
    head, rest = pat[0], pat[1:]
    if head == "#":
        return any(_match(rest, key[i:]) for i in range(len(key) + 1))
    if not key:
        return False
    return (head in ("*", key[0])) and _match(rest, key[1:])


def answer_route(incoming: Incoming, answer_type: str) -> tuple[str, str] | None:
    """Returns (exchange, routing key) an answer to ``incoming`` goes to, or None.

    An answer goes to ``reply_to`` through the default exchange when the
    message had one (API calls over direct reply-to). Otherwise it goes back
    the way the command came: a command on ``agent.<guid>.*`` is answered on
    ``mgmt.<guid>.<AnswerType>`` and one on ``mgmt.<guid>.*`` on
    ``agent.<guid>.<AnswerType>``. Anything else has no route.
    """
    if incoming.reply_to:
        return "", incoming.reply_to
    words = incoming.routing_key.split(".")
    if len(words) >= 3 and words[0] in ("agent", "mgmt"):
        peer = "mgmt" if words[0] == "agent" else "agent"
        return COMMANDS_EXCHANGE, f"{peer}.{words[1]}.{answer_type}"
    return None


def body_id(body: bytes) -> str:
    """Derives a stable key for a delivery whose sender gave no ``message_id``.

    The bus counts redeliveries and names dead letters by it; it is never a
    handler's ``message_id`` (identical messages without an id are distinct).
    """
    return "sha1-" + hashlib.sha1(body).hexdigest()


class BusLike(Protocol):
    """The interface of the bus on every transport (see docs/bus-contract.md)."""

    config: BusConfig

    def connect(self) -> None: ...
    def close(self) -> None: ...
    def declare_queue(self, name: str, bindings: Sequence[str], *,
                      exchange: str = COMMANDS_EXCHANGE) -> None: ...
    def declare_agent_queue(self, guid: str) -> str: ...
    def declare_mgmt_queues(self) -> None: ...
    def publish(self, routing_key: str, message: Message, *, exchange: str = COMMANDS_EXCHANGE,
                correlation_id: str | None = None, message_id: str | None = None,
                reply_to: str | None = None, expiration_s: float | None = None,
                headers: dict[str, Any] | None = None,
                on_confirmed: Callable[[], None] | None = None) -> str: ...
    def send_to_agent(self, guid: str, message: Message, *, correlation_id: str | None = None,
                      message_id: str | None = None) -> str: ...
    def send_to_mgmt(self, guid: str, message: Message, *, correlation_id: str | None = None,
                     message_id: str | None = None) -> str: ...
    def publish_event(self, routing_key: str, event: Message, *,
                      message_id: str | None = None) -> str: ...
    def wait_for_confirms(self, timeout: float = 30.0) -> None: ...
    def request(self, message: Message, *, timeout: float = 10.0) -> Message: ...
    def consume(self, queue: str, handlers: Mapping[type[Message], Handler],
                batches: Mapping[type[Message], Batching] | None = None) -> None: ...
    def call_every(self, interval_s: float, fn: Callable[[], None]) -> None: ...
    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None: ...
    def run(self, *, until: Callable[[], bool] | None = None,
            timeout: float | None = None) -> None: ...
    def on_reconnect(self, fn: Callable[[], None]) -> None: ...
    def stop(self) -> None: ...


class BusShortcuts:
    """The queue and routing-key spellings of hostdev, for any bus.

    A subclass provides ``declare_queue`` and ``publish``; these only build names.
    """

    def declare_queue(self, name: str, bindings: Sequence[str], *,
                      exchange: str = COMMANDS_EXCHANGE) -> None:
        raise NotImplementedError

    def declare_agent_queue(self, guid: str) -> str:
        """Declares ``hostdev.agent.<guid>`` bound to ``agent.<guid>.#``; returns its name."""
        name = f"hostdev.agent.{guid}"
        self.declare_queue(name, [f"agent.{guid}.#"])
        return name

    def declare_mgmt_queues(self) -> None:
        """Declares ``hostdev.mgmt`` (binds ``mgmt.#``) and ``hostdev.api`` (binds ``api.#``)."""
        self.declare_queue(MGMT_QUEUE, ["mgmt.#"])
        self.declare_queue(API_QUEUE, ["api.#"])

    def publish(self, routing_key: str, message: Message, *, exchange: str = COMMANDS_EXCHANGE,
                correlation_id: str | None = None, message_id: str | None = None,
                reply_to: str | None = None, expiration_s: float | None = None,
                headers: dict[str, Any] | None = None,
                on_confirmed: Callable[[], None] | None = None) -> str:
        raise NotImplementedError

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


def queue_arguments(config: BusConfig, *, dead_letter: bool = True) -> dict[str, Any]:
    """Returns the x-arguments of a hostdev queue for the configured queue type."""
    args: dict[str, Any] = {"x-queue-type": config.queue_type}
    if dead_letter:
        args["x-dead-letter-exchange"] = DEAD_EXCHANGE
        if config.queue_type == "quorum":
            args["x-delivery-limit"] = config.delivery_limit
    return args
