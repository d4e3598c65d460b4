"""The outbox: events and agent commands written in the transaction that causes them.

A row is added inside the caller's transaction, so a message exists exactly
when its cause committed; ``OutboxPublisher`` publishes rows after commit:
the ones a handler just wrote (``publish_now``, straight from memory, no
read back), and periodically anything a crashed daemon left behind
(``publish_stale``). Rows published from memory are marked published in
batches (``mark_published``), each once the broker confirmed it: the bus
calls back when a confirm arrives, so nothing waits for confirms and a
handler costs no second transaction. A publish the bus gives up (refused
repeatedly) is never confirmed: its row stays unpublished and the stale
sweep publishes it again. Delivery is at-least-once: each row gets a
random message id when it is written (kept in the row), so a second
publication of the same row carries the same id and receivers drop it, and
nobody can guess the id of a command (an answer must name it).

Routing keys starting with ``agent.`` go to ``hostdev.commands`` (commands
for one agent); all others go to ``hostdev.events``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from functools import partial
from typing import Final, Protocol, cast

import structlog
from sqlalchemy import Connection, Engine, Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from hostdev.messages.base import Message
from hostdev.messages.bus.contract import COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from hostdev.messages.codec import decode, encode
from hostdev.mgmt.persistence.database import PreparedStatement, session_scope
from hostdev.mgmt.persistence.models import OutboxEvent, utcnow

log = structlog.get_logger()



class Publisher(Protocol):
    """The part of the Bus the outbox needs."""

    def publish(self, routing_key: str, message: Message, *, exchange: str = ...,
                correlation_id: str | None = None, message_id: str | None = None,
                reply_to: str | None = None, expiration_s: float | None = None,
                headers: dict[str, object] | None = None,
                on_confirmed: Callable[[], None] | None = None) -> str:
        """Publishes one message; returns its message id; calls ``on_confirmed`` once the
        broker confirmed it."""
        ...

    def wait_for_confirms(self, timeout: float = 30.0) -> None:
        """Returns once the broker confirmed everything published so far."""
        ...


def new_message_id() -> str:
    """Returns a fresh message id for a row: random, so an agent cannot guess another's."""
    return uuid.uuid4().hex


def message_id_of(row_id: int, message_id: str | None) -> str:
    """Returns the AMQP message id a row is published with (rows older than the id column
    have none and keep the id they were first published with)."""
    return message_id or f"outbox-{row_id}"


#: One row written by this process: id, message id, routing key, message.
Pending = tuple[int, str, str, Message]


def _values(routing_key: str, message: Message) -> dict[str, object]:
    return {"routing_key": routing_key, "type": type(message).__name__,
            "body": encode(message), "created_at": utcnow(), "message_id": new_message_id()}


#: The table, for Core statements: cheaper than ORM-enabled ones on the hot path.
_TABLE: Final = cast(Table, OutboxEvent.__table__)
#: Inserts rows and returns their ids in parameter order.
_INSERT_MANY = insert(_TABLE).returning(_TABLE.c.id, sort_by_parameter_order=True)
#: Inserts one row, the common case (one event per transaction): its id
#: comes back with the server's answer (``lastrowid``), with no result set.
_INSERT_ONE = PreparedStatement(insert(_TABLE).values(
    {name: bindparam(name)
     for name in ("routing_key", "type", "body", "created_at", "message_id")}))


class Outbox:
    """The outbox of one transaction: rows queued for one INSERT, rows awaiting publication.

    ``UnitOfWork.run_each`` creates one per transaction (shared by its
    works), calls ``flush`` before the commit and publishes ``pending`` after it.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._queued: list[tuple[str, Message, dict[str, object]]] = []
        #: Rows written in this transaction, in order, for publication after commit.
        self.pending: list[Pending] = []

    def add(self, routing_key: str, message: Message) -> None:
        """Queues an event; ``flush`` writes the queued rows at once."""
        self._queued.append((routing_key, message, _values(routing_key, message)))

    def send(self, routing_key: str, message: Message) -> str:
        """Queues a command and returns its message id (for correlation).

        The id is made here, so the row is written by ``flush`` with the
        events around it: one round trip, the rows in the order of their causes.
        """
        values = _values(routing_key, message)
        self._queued.append((routing_key, message, values))
        return str(values["message_id"])

    def flush(self) -> None:
        """Writes the queued rows in one multi-row INSERT, in the transaction.

        Keeps them for publication after the commit.
        """
        queued, self._queued = self._queued, []
        if not queued:
            return
        values = [row for _, _, row in queued]
        connection = self._connection
        if len(values) == 1:
            ids = [_INSERT_ONE.execute(connection, values[0]).lastrowid]
        else:
            ids = list(connection.execute(_INSERT_MANY, values).scalars().all())
        self.pending.extend(
            (row_id, str(row["message_id"]), key, message)
            for row_id, (key, message, row) in zip(ids, queued, strict=True))


def exchange_for(routing_key: str) -> str:
    """Returns the exchange a routing key is published on."""
    return COMMANDS_EXCHANGE if routing_key.startswith("agent.") else EVENTS_EXCHANGE


class OutboxPublisher:
    """Publishes committed outbox rows on the bus and marks them published."""

    def __init__(self, engine: Engine, bus: Publisher, *, stale_after_s: float = 5.0,
                 batch: int = 500) -> None:
        self._engine = engine
        self._bus = bus
        self._stale_after = timedelta(seconds=stale_after_s)
        self._batch = batch
        #: Rows published from memory whose publish the broker confirmed, to mark.
        self._confirmed: list[int] = []

    def publish_now(self, rows: Sequence[Pending]) -> int:
        """Publishes rows just committed by this process; each is marked once confirmed.

        Nothing waits for the broker: its confirm calls back on the bus's
        loop thread, and ``mark_published`` marks the confirmed rows later.
        """
        for row_id, message_id, routing_key, message in rows:
            self._bus.publish(routing_key, message, exchange=exchange_for(routing_key),
                              message_id=message_id,
                              on_confirmed=partial(self._on_confirmed, row_id))
        return len(rows)

    def _on_confirmed(self, row_id: int) -> None:
        self._confirmed.append(row_id)

    def mark_published(self) -> int:
        """Marks the rows the broker confirmed since the last call, in one UPDATE; never waits.

        A row whose publish is not confirmed yet waits for a later call; one the
        bus gave up is never marked here (the stale sweep publishes it again).
        """
        if not self._confirmed:
            return 0
        ids, self._confirmed = self._confirmed, []
        try:
            with session_scope(self._engine) as session:
                session.execute(update(OutboxEvent).where(OutboxEvent.id.in_(ids))
                                .values(published_at=utcnow()))
        except Exception:
            self._confirmed[:0] = ids  # next time; the stale sweep may republish meanwhile
            raise
        return len(ids)

    def mark_all_published(self, timeout: float = 5.0) -> int:
        """Waits up to ``timeout`` for every confirm, then marks the confirmed rows (at exit).

        Raises:
            BusError: not everything was confirmed in time (the confirmed rows
                are marked all the same).
        """
        try:
            self._bus.wait_for_confirms(timeout)
        finally:
            marked = self.mark_published()
        return marked

    def publish_stale(self) -> int:
        """Publishes rows left unpublished longer than ``stale_after_s`` (crash recovery)."""
        self.mark_published()
        cutoff = utcnow() - self._stale_after
        with session_scope(self._engine) as session:
            rows = session.scalars(
                select(OutboxEvent).where(OutboxEvent.published_at.is_(None),
                                          OutboxEvent.created_at < cutoff)
                .order_by(OutboxEvent.id).limit(self._batch)
                .with_for_update(skip_locked=True)).all()
            count = self._publish(session, list(rows))
        if count:
            log.info("outbox_stale_published", count=count)
        return count

    def _publish(self, session: Session, rows: list[OutboxEvent]) -> int:
        for row in rows:
            self._bus.publish(row.routing_key, decode(row.body),
                              exchange=exchange_for(row.routing_key),
                              message_id=message_id_of(row.id, row.message_id))
        if rows:
            # Marked published only once the broker has them: a crash before
            # this line publishes them again (same message ids) later.
            self._bus.wait_for_confirms()
            session.execute(update(OutboxEvent)
                            .where(OutboxEvent.id.in_([row.id for row in rows]))
                            .values(published_at=utcnow()))
        return len(rows)

    def purge(self, older_than_s: float = 86400.0) -> None:
        """Deletes rows published more than ``older_than_s`` ago."""
        self.mark_published()
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        with session_scope(self._engine) as session:
            session.query(OutboxEvent).filter(OutboxEvent.published_at < cutoff).delete()
