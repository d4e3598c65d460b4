"""What to do with one delivery: decode, dispatch by type, classify the outcome.

A consumer may handle some message types in batches (``contract.Batching``):
the bus decodes each delivery (:func:`decode_delivery`), puts those of such a
type aside, and :func:`handle_batch` later judges each message of the run as
:func:`handle_message` judges one.

Called by ``core.LinkBus`` for every delivery on every transport, so each is
treated the same way. The bus then acks, requeues or dead-letters through its
link; this module does no I/O besides calling the handler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Literal, NamedTuple

import structlog

from hostdev.messages.base import Answer, Message
from hostdev.messages.bus.contract import (
    CONTENT_TYPE,
    BatchHandler,
    Handler,
    Incoming,
    answer_route,
    capped,
)
from hostdev.messages.codec import decode
from hostdev.messages.commands import ErrorAnswer
from hostdev.messages.errors import DecodeError, TransientError
from hostdev.messages.runtime.logging import bound_message, debug_enabled
from hostdev.messages.runtime.metrics import count, count_outcome

log = structlog.get_logger()

Action = Literal["ack", "requeue", "dead"]


class Outcome(NamedTuple):
    """The verdict on one delivery (a named tuple: one is made per delivery, cheaply).

    Attributes:
        action: ``ack`` (handled), ``requeue`` (transient failure, deliver again)
            or ``dead`` (publish a copy to hostdev.dead with ``reason``, then ack).
        reason: why it is dead-lettered or requeued, in words for an operator.
        answer: a message to send back on ``route`` (the handler's answer, or
            an ErrorAnswer for a dead-lettered message), or None.
        route: (exchange, routing key) for ``answer``.
        message_type: the decoded type name, when decoding got that far.
        copy: for ``dead``, False when no copy may be published: the delivery
            is rejected without requeue and the broker dead-letters it itself.
    """

    action: Action
    reason: str = ""
    answer: Message | None = None
    route: tuple[str, str] | None = None
    message_type: str | None = None
    copy: bool = True


class BatchItem(NamedTuple):
    """One delivery of a batch: the decoded message, its facts, its delivery count."""

    message: Message
    incoming: Incoming
    attempts: int


@count_outcome  # hostdev_messages_handled_total / _dead_lettered_total
def handle_delivery(
    body: bytes,
    *,
    content_type: str | None,
    type_property: str | None,
    incoming: Incoming,
    handlers: Mapping[type[Message], Handler],
    attempts: int,
    delivery_limit: int,
) -> Outcome:
    """Decodes ``body``, runs its handler and says what to do with the delivery.

    Never raises for anything the message or handler did (only BaseException
    such as KeyboardInterrupt escapes), so one message cannot kill the loop.

    Args:
        body: the raw AMQP body.
        content_type: the AMQP content_type property (None or application/json accepted).
        type_property: the AMQP ``type`` property; when set it must equal the body's type.
        incoming: the delivery facts given to the handler.
        handlers: handler per message class (a handler of a base class serves subclasses).
        attempts: how many times this message has been delivered, this one included.
        delivery_limit: after this many transient failures the message is dead-lettered.
    """
    decoded = decode_delivery(body, content_type=content_type, type_property=type_property,
                              incoming=incoming)
    if isinstance(decoded, Outcome):
        return decoded
    return handle_message(decoded, incoming=incoming, handlers=handlers, attempts=attempts,
                          delivery_limit=delivery_limit)


def decode_delivery(body: bytes, *, content_type: str | None, type_property: str | None,
                    incoming: Incoming) -> Message | Outcome:
    """Returns the typed message of a delivery, or the verdict dead-lettering it (not counted)."""
    if content_type not in (None, "", CONTENT_TYPE):
        return _dead(incoming, None, "decode",
                     f"content_type {content_type!r} is not {CONTENT_TYPE} ({_where(incoming)})")
    try:
        message = decode(body)
    except DecodeError as exc:
        return _dead(incoming, None, "decode", f"undecodable message ({_where(incoming)}): {exc}")
    name = type(message).__name__
    if type_property and type_property != name:
        return _dead(incoming, message, "invalid",
                     f"AMQP property type={type_property!r} but the body is a {name} "
                     f"({_where(incoming)}); the sender must set both to the same type")
    return message


def handle_message(message: Message, *, incoming: Incoming,
                   handlers: Mapping[type[Message], Handler], attempts: int,
                   delivery_limit: int) -> Outcome:
    """Runs the handler of a decoded message and says what to do with it (not counted)."""
    handler = _find_handler(type(message), handlers)
    if handler is None:
        known = ", ".join(sorted(cls.__name__ for cls in handlers)) or "none"
        return _dead(incoming, message, "invalid",
                     f"no handler for {type(message).__name__} on {_where(incoming)} "
                     f"(handled here: {known})")
    return _verdict(message, incoming, lambda: handler(message, incoming), attempts,
                    delivery_limit, getattr(handler, "__qualname__", "?"))


def handle_batch(items: Sequence[BatchItem], handler: BatchHandler,
                 delivery_limit: int) -> list[Outcome]:
    """Runs a batch handler on a run of decoded deliveries; returns each one's verdict.

    The handler returns one result per item: its answer (or None), or the
    exception handling that item raised. Each is judged as if a handler of
    that one message had returned or raised it: a refused item is
    dead-lettered with its reason, a transient failure requeued, and no
    other item pays for it. A batch handler that raises (or miscounts)
    fails every item of the batch with that error.
    """
    name = getattr(handler, "__qualname__", "?")
    try:
        results: list[Message | Exception | None] = list(
            handler([(item.message, item.incoming) for item in items]))
        if len(results) != len(items):
            raise RuntimeError(f"it returned {len(results)} results for {len(items)} messages")
    except Exception as exc:
        log.exception("batch_handler_failed", handler=name, size=len(items))
        return [count(_dead(item.incoming, item.message, "internal",
                            f"{type(item.message).__name__} batch handler {name} failed: "
                            f"{type(exc).__name__}: {exc} ({_where(item.incoming)})"))
                for item in items]
    return [count(_verdict(item.message, item.incoming, partial(_result, result),
                           item.attempts, delivery_limit, name))
            for item, result in zip(items, results, strict=True)]


def _result(result: Message | Exception | None) -> Message | None:
    if isinstance(result, Exception):
        raise result
    return result


def _verdict(message: Message, incoming: Incoming, call: Callable[[], object], attempts: int,
             delivery_limit: int, handler_name: str) -> Outcome:
    """Runs ``call`` (the message's handler) and classifies what it returned or raised."""
    name = type(message).__name__
    timed = debug_enabled()  # message_handled costs nothing at the daemons' default level
    started = time.perf_counter() if timed else 0.0
    with bound_message(incoming.message_id, incoming.correlation_id,
                       message_type=name, queue=incoming.queue):
        try:
            result = call()
        except TransientError as exc:
            if attempts >= delivery_limit:
                return _dead(incoming, message, "unavailable",
                             f"{name} handler failed transiently on each of {attempts} "
                             f"deliveries, the delivery limit ({_where(incoming)}): {exc}")
            reason = capped(str(exc))
            log.warning("message_requeued", error=reason, attempts=attempts,
                        delivery_limit=delivery_limit)
            return Outcome("requeue", reason=reason, message_type=name)
        except Exception as exc:
            code = getattr(exc, "code", None)
            if not isinstance(code, str) or code == "internal":
                log.exception("handler_failed", handler=handler_name)
                code = "internal"
            # An error with a code is a refusal the handler meant (forbidden,
            # invalid ...): its reason is logged once by _dead, without a traceback.
            return _dead(incoming, message, code,
                         f"{name} handler raised {type(exc).__name__}: {exc} ({_where(incoming)})")
        if timed:
            log.debug("message_handled",
                      duration_ms=round((time.perf_counter() - started) * 1e3, 3))
    if result is None:
        return Outcome("ack", message_type=name)
    if not isinstance(result, Message):
        return _dead(incoming, message, "internal",
                     f"{name} handler returned {type(result).__name__}, expected a Message "
                     f"or None ({_where(incoming)})")
    route = answer_route(incoming, type(result).__name__)
    if route is None:
        log.warning("answer_not_routed", answer_type=type(result).__name__,
                    routing_key=incoming.routing_key,
                    hint="the message had no reply_to and did not come from agent.* or mgmt.*")
    return Outcome("ack", answer=result if route else None, route=route, message_type=name)


def _where(incoming: Incoming) -> str:
    """Names the delivery in a dead-letter reason (built only when one is)."""
    return f"queue {incoming.queue!r}, message_id {incoming.message_id}"


def _find_handler(cls: type[Message], handlers: Mapping[type[Message], Handler]) -> Handler | None:
    handler = handlers.get(cls)
    if handler is not None:
        return handler
    for base in cls.__mro__[1:]:
        handler = handlers.get(base)
        if handler is not None:
            return handler
    return None


def _dead(incoming: Incoming, message: Message | None, code: str, reason: str) -> Outcome:
    """Builds a dead-letter verdict, with an ErrorAnswer where someone waits for an answer.

    An error answer goes to ``reply_to``, or back along the agent/mgmt route of a
    decoded command; never in answer to an answer, so two peers cannot bounce
    errors at each other forever. The reason is capped (``contract.capped``):
    it quotes the message and the handler's error, and becomes a header.
    """
    reason = capped(reason)
    log.error("message_dead_lettered", reason=reason, code=code, message_id=incoming.message_id,
              routing_key=incoming.routing_key, queue=incoming.queue)
    route: tuple[str, str] | None = None
    if incoming.reply_to:
        route = ("", incoming.reply_to)
    elif message is not None and not isinstance(message, Answer):
        route = answer_route(incoming, ErrorAnswer.__name__)
    answer = ErrorAnswer(details=reason, code=code) if route else None
    return Outcome("dead", reason=reason, answer=answer, route=route,
                   message_type=type(message).__name__ if message is not None else None)
