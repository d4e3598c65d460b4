"""A message on the wire, transport-neutral: one to publish, one consumed, an answer.

The bus turns a typed message into an :class:`Outgoing` and hands it to its
link; a link hands the bus a :class:`Delivery` for every message it consumed.
Properties are named as in AMQP (``message_id``, ``correlation_id``,
``reply_to``, ``user_id``, ``content_type``, ``type`` ...), so every transport
carries the same facts.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from hostdev.messages.base import Message
from hostdev.messages.bus.contract import COMMANDS_EXCHANGE, CONTENT_TYPE, DIRECT_REPLY_TO
from hostdev.messages.codec import decode, encode
from hostdev.messages.commands import ErrorAnswer
from hostdev.messages.errors import BusError, DecodeError, RemoteError


@dataclass(frozen=True)
class Outgoing:
    """One message to publish, encoded, with every hostdev property.

    Attributes:
        exchange: where it goes (``""`` is the default exchange, for ``reply_to``).
        routing_key: its routing key (a queue name on the default exchange).
        body: the encoded message.
        properties: the AMQP properties besides headers and expiration; None
            values are left out.
        headers: the AMQP headers.
        expiration_s: seconds after which an unconsumed copy expires, or None.
        on_confirmed: called (on the thread that owns the link) once the broker
            confirmed this publish, or None.
    """

    exchange: str
    routing_key: str
    body: bytes
    properties: dict[str, Any]
    headers: dict[str, Any]
    expiration_s: float | None = None
    on_confirmed: Callable[[], None] | None = None

    @property
    def message_id(self) -> str:
        """The ``message_id`` property (always set)."""
        return str(self.properties["message_id"])

    @property
    def mandatory(self) -> bool:
        """Commands are mandatory: one no queue takes is dead-lettered, not dropped."""
        return self.exchange == COMMANDS_EXCHANGE

    @property
    def republish(self) -> bool:
        """False for answers over direct reply-to, which a lost connection must not resend.

        Their request is redelivered and answered again, and resending to a
        ``reply_to`` the broker rejects would only kill the new connection too.
        """
        return not self.routing_key.startswith(DIRECT_REPLY_TO)


def new_outgoing(message: Message, *, exchange: str, routing_key: str, app_id: str,
                 user_id: str, message_id: str | None = None,
                 correlation_id: str | None = None, reply_to: str | None = None,
                 expiration_s: float | None = None,
                 headers: Mapping[str, Any] | None = None,
                 on_confirmed: Callable[[], None] | None = None) -> Outgoing:
    """Encodes ``message`` with the properties every hostdev publish carries."""
    props: dict[str, Any] = {
        "content_type": CONTENT_TYPE,
        "type": type(message).__name__,
        "message_id": message_id or str(uuid.uuid4()),
        "timestamp": int(time.time()),
        "app_id": app_id,
        "user_id": user_id,
        "delivery_mode": 2,
    }
    if correlation_id:
        props["correlation_id"] = correlation_id
    if reply_to:
        props["reply_to"] = reply_to
    return Outgoing(exchange, routing_key, encode(message), props, dict(headers or {}),
                    expiration_s, on_confirmed)


class Delivery(NamedTuple):
    """One message a link consumed, for the bus to handle and then settle through the link.

    A named tuple: links make one per delivery, and it costs a fraction of a
    frozen dataclass.

    Attributes:
        body: the raw body.
        properties: the AMQP properties by name (missing ones are absent).
        headers: the AMQP headers (``x-delivery-count`` where the broker counts); a
            dict of the delivery's own, handed to the handler as ``Incoming.headers``.
        routing_key: the key it was published with.
        redelivered: the broker delivered it before.
        queue: the queue it was consumed from.
        token: the link's own handle on the delivery (opaque to the bus).
    """

    body: bytes
    properties: Mapping[str, Any]
    headers: dict[str, Any]
    routing_key: str
    redelivered: bool
    queue: str
    token: Any


def decode_answer(body: bytes, name: str, message_id: str) -> Message:
    """Returns the typed answer to request ``name``, raising for an ErrorAnswer.

    Raises:
        RemoteError: the answer is an ErrorAnswer (its code is kept).
        BusError: the answer is undecodable.
    """
    try:
        answer = decode(body)
    except DecodeError as exc:
        raise BusError(f"the answer to {name} (message_id {message_id}) is undecodable: {exc}"
                       ) from exc
    if isinstance(answer, ErrorAnswer):
        raise RemoteError(f"{name} (message_id {message_id}) failed remotely "
                          f"[{answer.code}]: {answer.details}", code=answer.code)
    return answer
