"""The management daemon's message pipeline, the same steps for every message it consumes.

In order: bind the log context, check the sender, de-duplicate by
``message_id`` (recorded in ``handled_messages`` as the transaction's first
statement, so a message is handled once even with several daemons), run the
work in a unit of work, and map errors to answers. Each queue gives its own
sender check and error mapping; each message type a ``Route``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from hostdev.messages.base import Message
from hostdev.messages.bus.contract import BatchHandler, Incoming
from hostdev.messages.runtime.logging import bound_message
from hostdev.mgmt.persistence.unit_of_work import TxContext, UnitOfWork

log = structlog.get_logger()

#: What a queue's consumer calls for one message.
Handler = Callable[[Any, Incoming], Message | None]
#: The work of one message, in its transaction.
Work = Callable[[TxContext, Any, Incoming], Message | None]
#: The work of a run of messages in one transaction: says, per message, whether
#: it took it (False: the message is handled alone, by its route, after the commit),
#: or gives its answer (taken; the answer goes out after the commit).
BatchWork = Callable[[TxContext, Sequence[tuple[Any, Incoming]]], Sequence[bool | Message]]


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

    def batch_handler(self, kind: type[Message], route: Route, work: BatchWork) -> BatchHandler:
        """Returns the bus's batch handler for ``kind``: one transaction for a run of messages.

        Each message's sender is checked alone (a refused one is dead-lettered
        and costs no other); ``work`` takes the rest in one unit of work (and
        answers those it answers, after the commit). What
        it does not take, and every message of a run whose transaction
        failed, goes through ``route`` alone, exactly as without batching.
        Only for routes that record nothing (``never``): a batch keeps no ids.
        """
        if route.record is not never:
            raise ValueError(f"{kind.__name__}: a batch records no message ids; its route "
                             "must record none (record=never)")
        one = self.handler(kind, route)
        what = f"{kind.__name__} batch"

        def handle(items: Sequence[tuple[Any, Incoming]]) -> list[Message | Exception | None]:
            results, checked = self._senders_checked(items)
            run = [items[index] for index in checked]
            try:
                taken = self.work.run(lambda tx: work(tx, run), what=what) if run else []
            except Exception as exc:
                log.warning("batch_failed", what=what, size=len(run), error=str(exc),
                            hint="its messages are handled one by one")
                taken = [False] * len(run)
            for index, done in zip(checked, taken, strict=True):
                if isinstance(done, Message):
                    results[index] = done
                elif not done:
                    results[index] = _result_of(one, *items[index])
            return results
        return handle

    def _senders_checked(self, items: Sequence[tuple[Any, Incoming]],
                         ) -> tuple[list[Message | Exception | None], list[int]]:
        """Judges each sender of a run alone: the results so far (a refusal's error
        answer), and the indexes of the messages whose sender may send them."""
        results: list[Message | Exception | None] = [None] * len(items)
        checked: list[int] = []
        for index, (message, incoming) in enumerate(items):
            with bound_message(incoming.message_id, incoming.correlation_id,
                               **self.log_context(message, incoming)):
                try:
                    self.check_sender(message, incoming)
                    checked.append(index)
                except Exception as exc:
                    results[index] = _result_of(self.on_error, message, incoming, exc)
        return results, checked

    def joint_handler(self, routes: Mapping[type[Message], Route], *,
                      what: str = "joint batch") -> BatchHandler:
        """Returns a batch handler running each message's own route, all in ONE transaction.

        For messages whose work is small and whose cost is the COMMIT (agent
        answers, lifecycle reports): each message's sender is checked alone
        (a refused one is dead-lettered with its reason and costs no other);
        the rest run in order, each by its route exactly as alone (its own
        ``TxContext``, its id recorded when the route records it), and share
        one COMMIT (``UnitOfWork.run_each``). If any of them raises (a
        redelivery already handled, a refusal, a database error), the whole
        transaction rolls back and every message is handled alone, in order,
        by its route: what a message does never depends on its batch. A run
        holding a redelivery, or with one message, is handled alone at once.
        A work may read ahead for the messages of its type right after it
        (``TxContext.ahead``, ``TxContext.run_cache``): the start answers of a
        run read all their jobs in one statement.
        """
        ones = {kind: self.handler(kind, route) for kind, route in routes.items()}

        def handle(items: Sequence[tuple[Any, Incoming]]) -> list[Message | Exception | None]:
            results, checked = self._senders_checked(items)
            # A redelivery may have been handled: alone, it is dropped without
            # undoing the others' work (its run is handled alone, in order).
            if len(checked) > 1 and not any(items[index][1].redelivered for index in checked):
                taken = [items[index] for index in checked]
                try:
                    done = self.work.run_each(
                        [self._joint_work(routes[type(message)], taken, position)
                         for position, (message, _) in enumerate(taken)], what=what)
                except Exception as exc:
                    log.warning("batch_failed", what=what, size=len(checked), error=str(exc),
                                hint="its messages are handled one by one")
                else:
                    for index, answer in zip(checked, done, strict=True):
                        results[index] = answer
                    return results
            for index in checked:
                message, incoming = items[index]
                results[index] = _result_of(ones[type(message)], message, incoming)
            return results
        return handle

    def _joint_work(self, route: Route, taken: Sequence[tuple[Any, Incoming]], position: int,
                    ) -> tuple[Callable[[TxContext], Message | None], str | None]:
        """Returns the work of message ``taken[position]`` in a joint transaction and
        the id it records, if any.

        The work sees the messages of its type right after it (``tx.ahead``);
        what the works before it read ahead is kept while the type stays the
        same: a work of another type may have changed those rows.
        """
        message, incoming = taken[position]
        kind = type(message)
        end = position + 1
        while end < len(taken) and type(taken[end][0]) is kind:
            end += 1
        ahead = taken[position:end]

        def work(tx: TxContext) -> Message | None:
            if tx.run_cache.get(_KIND) is not kind:
                tx.run_cache.clear()
                tx.run_cache[_KIND] = kind
            tx.ahead = ahead
            with bound_message(incoming.message_id, incoming.correlation_id,
                               **self.log_context(message, incoming)):
                return route.work(tx, message, incoming)
        return work, incoming.message_id if route.record(message) else None


#: The ``run_cache`` key naming the type of message whose rows it holds.
_KIND = "kind"


def _result_of(call: Callable[..., Message | None], *args: Any) -> Message | Exception | None:
    """Returns what ``call`` returns, or the exception it raises (a batch item's result)."""
    try:
        return call(*args)
    except Exception as exc:
        return exc


def no_check(_message: Any, _incoming: Incoming) -> None:
    """Accepts any sender (the broker's permissions decide who may publish)."""
