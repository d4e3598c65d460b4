"""Creates the MariaDB/MySQL database a URL names, with the character set hostdev's schema needs.

The migrations create tables, not the database itself: a DBA usually does
that once (docs/install.md). The demo, and whoever else wants a database made
on the spot, call :func:`create_database`; a user without the right to create
it gets one line saying what to run instead.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import make_url, text
from sqlalchemy.exc import DBAPIError, OperationalError

from hostdev.mgmt.errors import MgmtError
from hostdev.mgmt.persistence.database import create_database_engine, database_failure

#: Binary collation: names compare exactly, as on SQLite (docs/database.md).
DATABASE_OPTIONS: Final = "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"


def create_database_sql(name: str) -> str:
    """Returns the statement that creates database ``name`` as hostdev wants it."""
    return f"CREATE DATABASE `{name}` {DATABASE_OPTIONS}"


def create_database(url: str) -> bool:
    """Creates the MariaDB/MySQL database ``url`` names unless it exists; True if it did.

    A SQLite file is created by its first connection: nothing to do (False).

    Raises:
        DatabaseUnreachable: the server cannot be reached or refuses the login.
        MgmtError: the database is missing and this user may not create it;
            the text gives the statement a DBA runs instead.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() not in ("mysql", "mariadb"):
        return False
    name = parsed.database
    if not name or "`" in name:
        raise MgmtError(f"database URL {parsed.render_as_string()}: name the database after "
                        "the host, e.g. mysql+pymysql://hostdev@db.example.net/hostdev")
    engine = create_database_engine(parsed.set(database="").render_as_string(
        hide_password=False))
    try:
        with engine.connect() as conn:
            found = conn.execute(
                text("SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = :name"),
                {"name": name}).first()
            if found is not None:
                return False
            try:
                conn.exec_driver_sql(create_database_sql(name))
            except DBAPIError as exc:
                raise MgmtError(
                    f"database {name} does not exist and {parsed.username or 'this user'} may "
                    f"not create it ({exc.orig}); have a DBA run: {create_database_sql(name)}"
                ) from None
            return True
    except OperationalError as exc:
        raise database_failure(url, exc) from None
    finally:
        engine.dispose()
