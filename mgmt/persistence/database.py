"""Opens the management database and runs work in transactions that retry safely.

Two back ends:

- ``mysql+pymysql://user@host/db`` (TCP) or
  ``mysql+pymysql://root@localhost/db?unix_socket=/run/mysqld/mysqld.sock``:
  MariaDB/MySQL, for any number of management daemons; several such URLs
  separated by ``;`` are the nodes of a Galera cluster, tried in turn
  (``database_failover.py``).
- ``sqlite:///path/to/hostdev.db``: a file in WAL mode with foreign keys on,
  every write transaction opened with ``BEGIN IMMEDIATE``. SQLite allows one
  writer at a time: it is for ONE management daemon (the embedded default and
  the demo), never for several.

Work that may lose a race (a claim, a conditional transition) runs through
:func:`run_in_transaction`: each attempt is a NEW transaction, because under
REPEATABLE READ a retry inside the same one would read the same snapshot.

The Alembic environment and its migrations ship inside this package
(``migrations/`` beside this module), so a wheel creates and upgrades its
schema like a source checkout.
"""

from __future__ import annotations

import io
import random
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import ClauseElement, Connection, Dialect, Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler

from hostdev.mgmt.errors import ConfigError, Conflict, MgmtError
from hostdev.mgmt.persistence.database_failover import (
    TRANSACTIONS_RETRIED,
    driver_retry_reason,
    first_url,
    install_causal_reads,
    install_node_list,
    safe_urls,
    split_urls,
)

log = structlog.get_logger()

T = TypeVar("T")

#: The Alembic environment (``env.py``, ``script.py.mako``, ``versions/``), package data.
MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
READ_ONLY: Final = "hostdev_read_only"
SQLITE_BUSY_TIMEOUT_S: Final = 30.0


class RetryTransaction(MgmtError):
    """Raised inside a unit of work to ask for a rollback and a NEW transaction.

    Work raises it when it lost a race (a row changed between read and
    conditional update); :func:`run_in_transaction` rolls back and tries again.
    """

    code = "conflict"


class TransactionConflict(Conflict):
    """A transaction kept losing races or deadlocking and ran out of attempts."""


def create_database_engine(url: str, **kwargs: Any) -> Engine:
    """Creates an engine for a ``mysql+pymysql://`` or ``sqlite:///`` URL, set up as above.

    Args:
        url: the database URL, or several MariaDB/MySQL URLs separated by ``;``.
        **kwargs: passed on to :func:`sqlalchemy.create_engine` (``echo``, pool sizes).

    Raises:
        ConfigError: the URL names another back end, or SQLite in memory, or
            lists several URLs that are not all MariaDB/MySQL.
    """
    urls = split_urls(url)
    parsed = make_url(urls[0])
    backend = parsed.get_backend_name()
    if len(urls) > 1 and any(make_url(u).get_backend_name() not in ("mysql", "mariadb")
                             for u in urls):
        raise ConfigError(
            f"database URL {safe_urls(url)!r}: several URLs separated by ';' must all be "
            "mysql+pymysql://... (the nodes of one Galera cluster); SQLite takes one URL")
    if backend in ("mysql", "mariadb"):
        kwargs.setdefault("pool_recycle", 3600)
        # READ COMMITTED: locking reads take record locks only, no gap locks,
        # so a claim's FOR UPDATE SKIP LOCKED does not block another claim's
        # index update next to it (REPEATABLE READ does, until lock timeout).
        # Needs binlog_format ROW or MIXED (MariaDB's default) if binlog is on.
        kwargs.setdefault("isolation_level", "READ COMMITTED")
        # Every unit of work here ends its transaction (commit or rollback)
        # and a Connection rolls back an open one when closed, so the pool's
        # extra ROLLBACK on return only costs a round trip per transaction.
        kwargs.setdefault("pool_reset_on_return", None)
        engine = create_engine(parsed, **kwargs)
        install_causal_reads(engine)
        if len(urls) > 1:
            install_node_list(engine, urls)
        return engine
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ConfigError(
                f"database URL {url!r}: SQLite needs a file (sqlite:///path/hostdev.db); an "
                "in-memory database is private to one connection and loses everything"
            )
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
        engine = create_engine(parsed, **kwargs)
        _configure_sqlite(engine)
        return engine
    raise ConfigError(
        f"database URL {url!r}: back end {backend!r} is not supported; use "
        "mysql+pymysql://... (MariaDB/MySQL) or sqlite:///path"
    )


def _configure_sqlite(engine: Engine) -> None:
    """Turns on WAL and foreign keys and makes SQLAlchemy, not sqlite3, emit BEGIN."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # sqlite3's own transaction handling would BEGIN late (DEFERRED, only
        # before a write); we emit BEGIN ourselves in _on_begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock up front, so a read-then-write
        # transaction never fails half-way with SQLITE_BUSY on upgrade.
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


@contextmanager
def transaction(engine: Engine, *, read_only: bool = False) -> Iterator[Connection]:
    """Yields a Connection in a transaction that commits on success, rolls back on error.

    ``read_only`` opens a plain (deferred) transaction on SQLite, so readers
    do not queue behind the writer; it changes nothing on MariaDB.
    """
    with engine.connect() as conn:
        if read_only:
            conn = conn.execution_options(**{READ_ONLY: True})
        with conn.begin():
            yield conn


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """Yields an ORM Session in one transaction that commits on success, rolls back on error.

    The Session's ``connection()`` can be passed to the Core functions of
    ``hostdev.mgmt.devices.pci_devices`` so they join this transaction.
    """
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session


def is_retryable(exc: BaseException) -> bool:
    """Tells whether an error means "roll back and try again in a new transaction"."""
    return retry_reason(exc) is not None


def retry_reason(exc: BaseException) -> str | None:
    """Names why an error asks for a new transaction (``conflict``, ``connection``, ``busy``).

    None when it does not: the error is not about concurrency or the connection.
    """
    if isinstance(exc, RetryTransaction):
        return "conflict"
    return driver_retry_reason(exc) if isinstance(exc, DBAPIError) else None


def run_in_transaction(
    engine: Engine,
    work: Callable[[Connection], T],
    *,
    attempts: int = 30,
    what: str = "transaction",
) -> T:
    """Runs ``work(conn)`` in a transaction, retrying lost races in NEW transactions.

    ``work`` MUST be safe to run again from the start: everything it did in a
    failed attempt was rolled back. It signals a lost race by raising
    :class:`RetryTransaction`; deadlocks, lock wait timeouts, dropped
    connections and a busy SQLite are retried the same way, with a short
    randomised back-off.

    Raises:
        TransactionConflict: every attempt lost; the caller may try later.
    """
    for attempt in range(1, attempts + 1):
        try:
            with transaction(engine) as conn:
                return work(conn)
        except Exception as exc:
            reason = retry_reason(exc)
            if reason is None:
                raise
            if attempt == attempts:
                log.warning("transaction_gave_up", what=what, attempts=attempts, error=str(exc))
                raise TransactionConflict(
                    f"{what}: lost {attempts} attempts in a row to concurrent transactions "
                    f"(last: {exc}); the database is heavily contended, try again later"
                ) from exc
            TRANSACTIONS_RETRIED.labels(reason).inc()
            log.debug("transaction_retried", what=what, attempt=attempt, error=str(exc))
            time.sleep(random.uniform(0, min(0.05, 0.0005 * 2**attempt)))
    raise AssertionError("unreachable")  # pragma: no cover


class PreparedStatement:
    """A Core statement compiled once per dialect and run straight on the DBAPI cursor.

    For the few statements on hot paths (claims and releases): it skips
    Core's per-execution work (cache key, execution context, result
    wrapping), which on this hardware costs about as much as a MariaDB round
    trip (bench/alloc.py). It runs inside the Connection's transaction like
    any other statement, but does not fire Core's execution events (``echo``
    does not show it). Parameters are bound by name; the statement must not
    use expanding (``IN``) parameters nor leave a column with a Python-side
    default (``default=``, ``onupdate=``) without a value. Driver errors are re-raised as
    :class:`~sqlalchemy.exc.DBAPIError`, as Core would.
    """

    def __init__(self, statement: ClauseElement) -> None:
        self._statement = statement
        self._compiled: dict[str, _Compiled] = {}

    def _compile(self, dialect: Dialect) -> _Compiled:
        compiled = cast(SQLCompiler, self._statement.compile(dialect=dialect))
        if "POSTCOMPILE" in compiled.string:
            raise TypeError(f"{compiled.string!r}: expanding parameters cannot be prepared")
        defaulted = [c.name for c in (*compiled.insert_prefetch, *compiled.update_prefetch)]
        if defaulted:
            # Core's execution context computes Python-side defaults; we skip it.
            raise TypeError(
                f"{compiled.string!r}: give values for {defaulted}; a PreparedStatement does "
                "not run Python-side column defaults"
            )
        processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                processors[name] = processor
        defaults = {
            name: bind.effective_value for name, bind in compiled.binds.items()
            if not bind.required
        }
        order = tuple(compiled.positiontup) if compiled.positiontup is not None else None
        entry = _Compiled(compiled.string, order, defaults, processors)
        self._compiled[dialect.name] = entry
        return entry

    def execute(self, conn: Connection, params: Mapping[str, Any]) -> PreparedResult:
        """Runs the statement in ``conn``'s transaction; returns its rows and row count."""
        dialect = conn.dialect
        compiled = self._compiled.get(dialect.name) or self._compile(dialect)
        values = {**compiled.defaults, **params}
        for name, processor in compiled.processors.items():
            values[name] = processor(values[name])
        bound: Any = values if compiled.order is None else [values[n] for n in compiled.order]
        cursor = conn.connection.cursor()
        try:
            cursor.execute(compiled.sql, bound)
        except dialect.loaded_dbapi.Error as exc:
            if dialect.is_disconnect(exc, conn.connection.dbapi_connection, cursor):
                conn.invalidate(exc)
            raise DBAPIError.instance(
                compiled.sql, bound, exc, dialect.loaded_dbapi.Error, dialect=dialect
            ) from exc
        try:
            rows = cursor.fetchall() if cursor.description is not None else []
            return PreparedResult(list(rows), cursor.rowcount, cursor.lastrowid or 0)
        finally:
            cursor.close()


@dataclass(frozen=True, slots=True)
class PreparedResult:
    """The rows (plain tuples), row count and inserted id of one :class:`PreparedStatement` run.

    ``lastrowid`` is the id an INSERT of one row generated (the driver's
    ``cursor.lastrowid``: it comes with the server's answer, no result set);
    0 or meaningless for other statements.
    """

    rows: list[tuple[Any, ...]]
    rowcount: int
    lastrowid: int = 0


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    order: tuple[str, ...] | None
    defaults: dict[str, Any]
    processors: dict[str, Callable[[Any], Any]]


def alembic_config(
    url: str, *, connection: Connection | None = None, output: io.StringIO | None = None
) -> Config:
    """Builds an Alembic Config for ``url`` without an ini file.

    Args:
        url: the database URL (also used to pick the dialect in offline mode).
        connection: run the migrations on this connection instead of opening one.
        output: where offline mode (``sql=True``) writes its SQL.
    """
    config = Config(output_buffer=output) if output is not None else Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolates '%', which URL-encoded passwords contain.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Applies the migrations up to ``revision`` (the latest by default).

    Raises:
        DatabaseUnreachable: the database cannot be opened (one line, not a traceback).
    """
    current_revision(url)  # says in one line why the database cannot be opened
    command.upgrade(alembic_config(url), revision)
    log.info("database_upgraded", url=safe_urls(url), revision=revision)


class DatabaseUnreachable(MgmtError):
    """The database cannot be opened; the text is one line: the URL (password hidden), the cause.

    Attributes:
        permanent: False when the server did not answer (it may be starting);
            True when it answered no (unknown database, access denied) or
            the SQLite file cannot be opened.
    """

    def __init__(self, url: str, cause: str, *, permanent: bool) -> None:
        super().__init__(f"cannot open database {safe_urls(url)}: {cause}")
        self.permanent = permanent


#: MariaDB/MySQL client errors where the server did not answer (it may be starting).
_UNANSWERED = {2002, 2003, 2005, 2006, 2013}


def database_failure(url: str, exc: OperationalError) -> DatabaseUnreachable:
    """Returns the one-line failure for an error raised while connecting to ``url``."""
    args = exc.orig.args if exc.orig is not None else ()
    if args and isinstance(args[0], int):  # MariaDB/MySQL: (code, text)
        code, text = args[0], str(args[1]) if len(args) > 1 else ""
        return DatabaseUnreachable(url, f"{text} (error {code})",
                                   permanent=code not in _UNANSWERED)
    return DatabaseUnreachable(url, str(exc.orig), permanent=True)


def current_revision(url: str) -> str | None:
    """Returns the revision the database is at, None when it has no schema yet.

    Raises:
        DatabaseUnreachable: the database cannot be opened.
    """
    engine = create_database_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise database_failure(url, exc) from None
    finally:
        engine.dispose()


def offline_sql(url: str = "mysql+pymysql://", revision: str = "head") -> str:
    """Returns the SQL script of the migrations up to ``revision`` for ``url``'s dialect."""
    output = io.StringIO()
    command.upgrade(alembic_config(first_url(url), output=output), revision, sql=True)
    return output.getvalue()
