"""The management daemon's message pipeline, the same steps for every message it consumes.

In order: bind the log context, check the sender, de-duplicate by
``message_id`` (recorded in ``handled_messages`` as the transaction's first
statement, so a message is handled once even with several daemons), run the
work in a unit of work, and map errors to answers. Each queue gives its own
sender check and error mapping; each message type a ``Route``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hostdev.messages.base import Message
from hostdev.messages.bus.contract import Incoming
from hostdev.messages.runtime.logging import bound_message
from hostdev.mgmt.persistence.unit_of_work import TxContext, UnitOfWork

#: What a queue's consumer calls for one message.
Handler = Callable[[Any, Incoming], Message | None]
#: The work of one message, in its transaction.
Work = Callable[[TxContext, Any, Incoming], Message | None]


def always(_message: Any) -> bool:
    """Records every message of the route (it changes something)."""
    return True


def never(_message: Any) -> bool:
    """Records no message of the route (a query, or a report handled idempotently)."""
    return False


@dataclass(frozen=True)
class Route:
    """How one message type is handled.

    Attributes:
        work: runs in the transaction; returns the answer, if any.
        record: whether a message's id is recorded (and a redelivery refused).
    """

    work: Work
    record: Callable[[Any], bool] = never


@dataclass(frozen=True)
class Pipeline:
    """The steps every message of one queue goes through.

    Attributes:
        work: the unit of work that opens each transaction.
        log_context: the log fields a message is bound with (besides its ids).
        check_sender: raises when the message may not come from its sender.
        on_error: turns an error into an answer (or None), or raises it again.
    """

    work: UnitOfWork
    log_context: Callable[[Any, Incoming], dict[str, Any]]
    check_sender: Callable[[Any, Incoming], None]
    on_error: Callable[[Any, Incoming, Exception], Message | None]

    def handlers(self, routes: Mapping[type[Message], Route]) -> dict[type[Message], Handler]:
        """Returns a consumer's handler per message type."""
        return {kind: self.handler(kind, route) for kind, route in routes.items()}

    def handler(self, kind: type[Message], route: Route) -> Handler:
        """Returns the handler running ``route`` for messages of ``kind``."""
        what = kind.__name__

        def handle(message: Any, incoming: Incoming) -> Message | None:
            with bound_message(incoming.message_id, incoming.correlation_id,
                               **self.log_context(message, incoming)):
                try:
                    self.check_sender(message, incoming)
                    # Without an id there is nothing to de-duplicate by: handled each time.
                    message_id = incoming.message_id if route.record(message) else None
                    return self.work.run(lambda tx: route.work(tx, message, incoming),
                                         what=what, message_id=message_id)
                except Exception as exc:
                    return self.on_error(message, incoming, exc)
        return handle


def no_check(_message: Any, _incoming: Incoming) -> None:
    """Accepts any sender (the broker's permissions decide who may publish)."""
