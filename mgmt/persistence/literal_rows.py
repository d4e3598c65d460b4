"""One INSERT of many rows, each distinct value escaped once by the driver.

For the largest writes (a storm of start-ups: 50 new hosts of 16 devices
each, 800 rows of 20 columns in one statement). On MariaDB through PyMySQL,
an ``executemany`` escapes every value of every row in Python, which costs
the daemon more than the database's work. A fleet's rows repeat the same
values (device names, facts, states, the transaction's timestamp), so here
the statement is written with each distinct value of a column escaped once,
by the driver's own escaping (``Connection.escape``, which follows the
server's ``NO_BACKSLASH_ESCAPES``), after the column type's bind processing.
Other back ends take Core's ``executemany``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Table, insert
from sqlalchemy.exc import DBAPIError


def insert_rows(conn: Connection, table: Table, columns: Sequence[str],
                rows: Sequence[Sequence[Any]]) -> None:
    """Inserts ``rows`` (values in the order of ``columns``) in one statement, in the transaction.

    Raises:
        DBAPIError: the database refused the statement, as Core would raise it.
    """
    if not rows:
        return
    dialect = conn.dialect
    if dialect.driver != "pymysql":
        conn.execute(insert(table), [dict(zip(columns, row, strict=True)) for row in rows])
        return
    dbapi_connection = conn.connection.dbapi_connection
    escape: Callable[[Any], str] = dbapi_connection.escape  # type: ignore[union-attr]
    processors = [table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
                  for name in columns]
    caches: list[dict[Any, str]] = [{} for _ in columns]

    def literal(column: int, value: Any) -> str:
        cache = caches[column]
        text = cache.get(value)
        if text is None:
            processor = processors[column]
            text = cache[value] = escape(processor(value) if processor is not None else value)
        return text

    preparer = dialect.identifier_preparer
    sql = (f"INSERT INTO {preparer.format_table(table)} "
           f"({', '.join(preparer.quote(name) for name in columns)}) VALUES "
           + ",".join("(" + ",".join([literal(k, value) for k, value in enumerate(row)]) + ")"
                      for row in rows))
    cursor = conn.connection.cursor()
    try:
        cursor.execute(sql)
    except dialect.loaded_dbapi.Error as exc:
        if dialect.is_disconnect(exc, dbapi_connection, cursor):
            conn.invalidate(exc)
        raise DBAPIError.instance(sql[:2000], None, exc, dialect.loaded_dbapi.Error,
                                  dialect=dialect) from exc
    finally:
        cursor.close()
