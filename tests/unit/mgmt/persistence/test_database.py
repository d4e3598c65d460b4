"""Engine set-up from a URL, SQLite's locking, and retrying transactions."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pymysql
import pytest
from sqlalchemy import Connection, Engine, bindparam, insert, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from hostdev.mgmt.errors import ConfigError
from hostdev.mgmt.persistence.database import (
    MIGRATIONS_DIR,
    PreparedStatement,
    RetryTransaction,
    TransactionConflict,
    create_database_engine,
    is_retryable,
    run_in_transaction,
    transaction,
)
from hostdev.mgmt.persistence.models import Host, PciDevice
from tests.support.databases import sqlite_database


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Iterator[tuple[Path, Engine]]:
    """Yields a migrated SQLite file and an engine on it."""
    with sqlite_database(tmp_path) as url:
        engine = create_database_engine(url)
        yield Path(url.removeprefix("sqlite:///")), engine
        engine.dispose()


def test_sqlite_runs_wal_with_foreign_keys(sqlite_file: tuple[Path, Engine]) -> None:
    """SQLite connections use WAL and enforce foreign keys."""
    _, engine = sqlite_file
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    with pytest.raises(IntegrityError), transaction(engine) as conn:
        conn.execute(insert(PciDevice).values(
            host_id=999, name="x", domain="0000", bus="00", slot="00", function="0"))


def test_sqlite_write_transaction_takes_the_lock_at_begin(
    sqlite_file: tuple[Path, Engine],
) -> None:
    """A write transaction holds SQLite's write lock from BEGIN; a read-only one does not."""
    path, engine = sqlite_file
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with transaction(engine), pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        with transaction(engine, read_only=True) as conn:
            conn.exec_driver_sql("SELECT 1")
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
    finally:
        other.close()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "postgresql://x/y"])
def test_unsupported_urls_are_refused(url: str) -> None:
    """In-memory SQLite and other back ends are refused with the URLs that work."""
    with pytest.raises(ConfigError, match="sqlite:///"):
        create_database_engine(url)


def test_lost_races_are_retried_in_new_transactions(sqlite_file: tuple[Path, Engine]) -> None:
    """Work raising RetryTransaction runs again, each time on a new transaction."""
    _, engine = sqlite_file
    seen: list[Connection] = []

    def work(conn: Connection) -> str:
        seen.append(conn)
        if len(seen) < 3:
            raise RetryTransaction("lost")
        return "won"

    assert run_in_transaction(engine, work) == "won"
    assert len(seen) == 3


def test_retries_give_up_with_a_conflict(sqlite_file: tuple[Path, Engine]) -> None:
    """After the last attempt a TransactionConflict says the database is contended."""
    _, engine = sqlite_file

    def work(conn: Connection) -> None:
        raise RetryTransaction("lost")

    with pytest.raises(TransactionConflict, match="lost 3 attempts"):
        run_in_transaction(engine, work, attempts=3)


def test_other_errors_are_not_retried(sqlite_file: tuple[Path, Engine]) -> None:
    """An error that is not a lost race propagates after one attempt."""
    _, engine = sqlite_file
    calls = []

    def work(conn: Connection) -> None:
        calls.append(1)
        raise ValueError("bug")

    with pytest.raises(ValueError):
        run_in_transaction(engine, work)
    assert calls == [1]


def test_deadlocks_and_busy_sqlite_count_as_retryable() -> None:
    """MariaDB deadlock (1213) and SQLite 'database is locked' are retryable; others not."""
    deadlock = OperationalError("UPDATE", {}, pymysql.err.OperationalError(1213, "Deadlock"))
    busy = OperationalError("UPDATE", {}, sqlite3.OperationalError("database is locked"))
    syntax = OperationalError("UPDATE", {}, pymysql.err.OperationalError(1064, "syntax"))
    assert is_retryable(deadlock) and is_retryable(busy)
    assert not is_retryable(syntax) and not is_retryable(ValueError())


def test_migrations_ship_inside_the_package() -> None:
    """The Alembic environment and its versions sit in the installed package, not the checkout."""
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert (MIGRATIONS_DIR / "script.py.mako").is_file()
    assert sorted(MIGRATIONS_DIR.glob("versions/0001_*.py"))


def test_prepared_statement_binds_types_and_wraps_errors(
    sqlite_file: tuple[Path, Engine],
) -> None:
    """A PreparedStatement converts parameters like Core does and raises DBAPIError."""
    _, engine = sqlite_file
    stamp = datetime(2026, 1, 2, 3, 4, 5, 678901)
    insert_host = PreparedStatement(insert(Host).values(
        guid=bindparam("guid"), name="h", status="Up", cpus=1, memory_mb=1,
        hypervisor_version="", migration_uri="", foreign_domains=0, created_at=bindparam("at"),
        updated_at=bindparam("at")))
    with transaction(engine) as conn:
        result = insert_host.execute(conn, {"guid": "g-1", "at": stamp})
        assert result.rowcount == 1
    with engine.connect() as conn:
        row = conn.execute(select(Host.id, Host.created_at).where(Host.guid == "g-1")).one()
    assert tuple(row) == (result.lastrowid, stamp)
    with pytest.raises(DBAPIError) as caught, transaction(engine) as conn:
        insert_host.execute(conn, {"guid": "g-1", "at": stamp})  # duplicate guid
    assert isinstance(caught.value, IntegrityError)
    missing_default = PreparedStatement(insert(Host).values(guid="g-2", name="h"))
    with pytest.raises(TypeError, match="Python-side column defaults"), engine.connect() as conn:
        missing_default.execute(conn, {})
