"""Runs hostdev's migrations online (a connection) or offline (an SQL script).

The database URL comes, first found wins, from: a connection handed over by
``hostdev.mgmt.persistence.database`` (``config.attributes["connection"]``), ``-x
db_url=...`` on the alembic command line, ``HOSTDEV_DB_URL``, or
``sqlalchemy.url`` in the config.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection

from hostdev.mgmt.persistence.database import create_database_engine
from hostdev.mgmt.persistence.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = (
        context.get_x_argument(as_dictionary=True).get("db_url")
        or os.environ.get("HOSTDEV_DB_URL")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise SystemExit(
            "no database URL: pass -x db_url=mysql+pymysql://... or set HOSTDEV_DB_URL"
        )
    return url


def run_offline() -> None:
    """Writes the migrations as SQL for the URL's dialect, without connecting."""
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def _migrate(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    # sqlite3 in autocommit mode: statements sent here run outside any BEGIN.
    raw = connection.connection.driver_connection if sqlite else None
    if raw is not None:
        # Batch migrations copy and drop tables; SQLite only lets that through
        # with foreign keys off, and the pragma is ignored inside a transaction.
        raw.execute("PRAGMA foreign_keys=OFF")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=sqlite,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    if raw is not None:
        broken = raw.execute("PRAGMA foreign_key_check").fetchall()
        raw.execute("PRAGMA foreign_keys=ON")
        if broken:
            raise RuntimeError(f"migration left rows with dangling foreign keys: {broken[:10]}")


def run_online() -> None:
    """Applies the migrations on a live connection."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    engine = create_database_engine(_url())
    try:
        with engine.connect() as connection:
            _migrate(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
