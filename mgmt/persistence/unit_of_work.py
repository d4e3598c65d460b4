"""Runs a unit of work in an ORM transaction, retries lost races, then publishes its outbox.

Each attempt is a NEW transaction (a retry inside the same one would read the
same snapshot under REPEATABLE READ) with a NEW ``TxContext``: the
connection, an ORM session on it, the id of the message being handled, the
transaction's outbox and its caches, handed to the work explicitly. After
the commit, the outbox rows the work wrote are published at once; if that
fails they stay in the table and the periodic stale sweep publishes them.

The transaction belongs to the Core connection; the ORM session joins it
only when the work first asks for it. Hot paths (claims, releases, the
outbox) run Core statements on ``tx.connection`` and never pay for a
session, whose begin and commit cost more than the COMMIT round trip itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any, TypeVar, cast

import structlog
from sqlalchemy import Connection, Engine, Table, bindparam, insert, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import NumaPolicy, PciRequest
from hostdev.mgmt.errors import Conflict
from hostdev.mgmt.persistence import outbox
from hostdev.mgmt.persistence.database import PreparedStatement, run_in_transaction
from hostdev.mgmt.persistence.literal_rows import insert_rows
from hostdev.mgmt.persistence.models import HandledMessage, VmInstance, utcnow
from hostdev.mgmt.persistence.outbox import Outbox

log = structlog.get_logger()

_VMS = cast(Table, VmInstance.__table__)

T = TypeVar("T")


_HANDLED = cast(Table, HandledMessage.__table__)
#: One INSERT: the primary key refuses an id handled (or being handled) before.
_RECORD = PreparedStatement(insert(_HANDLED).values(
    message_id=bindparam("message_id"), handled_at=bindparam("now")))


@dataclass
class TxContext:
    """What one transaction carries from the handler to listeners and jobs.

    Attributes:
        connection: the connection the transaction runs on; Core statements
            run here directly, the ORM through ``session``.
        message_id: the id of the message being handled, when it is recorded
            (lets a redelivered request find the job it created).
        shared_outbox: the outbox of the transaction when several works share it.
        outbox: the events and commands this transaction writes (shared by
            the works of one ``run_each``, written by one INSERT before the commit).
        offering_requests: offering id -> its PCI requests, read once per transaction.
        offering_numa: offering id -> its NUMA policy, read with its PCI requests.
        offering_templates: offering id -> the template it names (None: none),
            when read with the offering.
        claimed: VM id -> addresses of the devices claimed in this transaction.
        host_guids: host id -> guid, read once per transaction.
        after_commit: callables run once the transaction committed.
        vm_values: VM id -> columns to write with the VM's next transition in
            this transaction (its UPDATE carries them), or else by ``flush``:
            one statement fewer when a transition follows.
        ahead: the message being handled and those of its type right after it
            in its run, as ``(message, incoming)`` (set by the pipeline's joint
            handler; empty when handled alone): what a work may read ahead for.
        run_cache: rows read ahead for the works of one run (``run_each``),
            one dict per attempt, emptied by the pipeline when the type of
            message changes: a work reads its row here instead of asking the
            database, and reads the rows of those ``ahead`` in one statement.
    """

    connection: Connection
    message_id: str | None = None
    shared_outbox: InitVar[Outbox | None] = None
    outbox: Outbox = field(init=False)
    offering_requests: dict[int, tuple[PciRequest, ...]] = field(default_factory=dict)
    offering_numa: dict[int, NumaPolicy] = field(default_factory=dict)
    offering_templates: dict[int, str | None] = field(default_factory=dict)
    claimed: dict[int, tuple[PciAddress, ...]] = field(default_factory=dict)
    host_guids: dict[int, str] = field(default_factory=dict)
    after_commit: list[Callable[[], None]] = field(default_factory=list)
    vm_values: dict[int, dict[str, object]] = field(default_factory=dict)
    ahead: Sequence[tuple[Any, Any]] = ()
    run_cache: dict[str, Any] = field(default_factory=dict)
    _session: Session | None = field(default=None, init=False, repr=False)

    def __post_init__(self, shared_outbox: Outbox | None) -> None:
        self.outbox = shared_outbox if shared_outbox is not None else Outbox(self.connection)

    @property
    def session(self) -> Session:
        """Returns the ORM session of the transaction, opened on ``connection`` at first use.

        It flushes before the commit but never commits nor rolls back by
        itself: the unit of work ends the connection's transaction.
        """
        if self._session is None:
            self._session = Session(bind=self.connection, expire_on_commit=False,
                                    join_transaction_mode="rollback_only")
        return self._session

    def flush(self) -> None:
        """Writes what the session holds and the VM columns waiting for a transition.

        The outbox is written by the unit of work, once for all its works.
        """
        if self._session is not None:
            self._session.flush()
        for vm_id, values in self.vm_values.items():
            self.connection.execute(update(_VMS).where(_VMS.c.id == vm_id).values(values))
        self.vm_values.clear()

    def close(self) -> None:
        """Closes the session, if one was opened (its objects stay loaded, detached)."""
        if self._session is not None:
            self._session.close()


class AlreadyHandled(Conflict):
    """The message was handled before: at-least-once delivery repeated it."""

    code = "duplicate"


class UnitOfWork:
    """Opens sessions on one engine and publishes what they wrote to the outbox."""

    def __init__(self, engine: Engine, publisher: outbox.OutboxPublisher | None = None) -> None:
        self.engine = engine
        self.publisher = publisher

    def run(self, work: Callable[[TxContext], T], *, what: str = "transaction",
            attempts: int = 20, message_id: str | None = None) -> T:
        """Runs ``work(context)`` in a new transaction; returns its result after commit.

        ``work`` MUST be safe to run again from the start. Lost races
        (``RetryTransaction``), deadlocks and a busy SQLite are retried in new
        transactions with a short randomised back-off. With ``message_id``,
        the id is recorded in ``handled_messages`` in the same transaction and
        a message handled before raises ``AlreadyHandled`` instead of running.

        Raises:
            AlreadyHandled: ``message_id`` was handled (committed) before.
            TransactionConflict: every attempt lost.
        """
        return self.run_each([(work, message_id)], what=what, attempts=attempts)[0]

    def run_each(self, works: Sequence[tuple[Callable[[TxContext], T], str | None]], *,
                 what: str = "transaction", attempts: int = 20) -> list[T]:
        """Runs several works, in order, in ONE transaction; returns their results after commit.

        Each work gets its own ``TxContext`` (as if run alone by :meth:`run`,
        with its own ``message_id`` recorded first) and is flushed before the
        next starts, so it sees what the works before it wrote; only the
        COMMIT is shared. If any work raises, the whole transaction rolls back
        and the exception propagates: nothing of any work is kept, no callback
        runs, nothing is published. Deadlocks and lost races retry the whole
        run in a new transaction, as :meth:`run` does.

        Raises:
            AlreadyHandled: one of the ids was handled (committed) before.
            TransactionConflict: every attempt lost.
        """
        def attempt(connection: Connection) -> tuple[list[T], list[TxContext]]:
            results: list[T] = []
            contexts: list[TxContext] = []
            shared = Outbox(connection)
            cache: dict[str, Any] = {}  # what the works read ahead for each other
            self._record(connection, [message_id for _, message_id in works
                                      if message_id is not None], what)
            for work, message_id in works:
                context = TxContext(connection, message_id, shared, run_cache=cache)
                contexts.append(context)
                try:
                    results.append(work(context))
                    context.flush()
                finally:
                    context.close()
            shared.flush()  # every work's events and commands in one INSERT
            return results, contexts

        results, contexts = run_in_transaction(self.engine, attempt, attempts=attempts, what=what)
        for context in contexts:
            for callback in context.after_commit:
                callback()
        if contexts:
            self._publish(contexts[0].outbox.pending)
        return results

    @staticmethod
    def _record(connection: Connection, message_ids: Sequence[str], what: str) -> None:
        """Records the ids of the messages handled, all in one INSERT (none: nothing)."""
        if not message_ids:
            return
        now = utcnow()
        try:
            if len(message_ids) == 1:
                _RECORD.execute(connection, {"message_id": message_ids[0], "now": now})
            else:
                insert_rows(connection, _HANDLED, ("message_id", "handled_at"),
                            [(message_id, now) for message_id in message_ids])
        except IntegrityError:
            which = (f"message {message_ids[0]} was" if len(message_ids) == 1 else
                     f"one of messages {', '.join(message_ids)} was")
            raise AlreadyHandled(f"{what}: {which} handled already (a redelivery); "
                                 "nothing done again") from None

    def _publish(self, rows: list[outbox.Pending]) -> None:
        if not rows or self.publisher is None:
            return
        try:
            self.publisher.publish_now(rows)
        except Exception as exc:  # the stale sweep publishes them later
            log.warning("outbox_publish_deferred", count=len(rows), error=str(exc))
