"""Inserts a new ORM object with one prepared Core INSERT, without a session.

For the rows a deploy creates (its VM and its job), on the hottest path of
the daemon: an ORM ``add`` and ``flush`` cost more CPU than the INSERT's
round trip. The object is filled as a flush would fill it (column defaults
for the attributes never set, then its generated id) and stays transient:
later changes to it are written by the caller's own statements, not by a
session.
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import Column, Connection, Table, bindparam, insert, inspect
from sqlalchemy.orm.attributes import set_committed_value

from hostdev.mgmt.persistence.database import PreparedStatement
from hostdev.mgmt.persistence.models import Base


class _Insert:
    """The prepared INSERT of one mapped class: every column but the generated id."""

    def __init__(self, model: type[Base]) -> None:
        mapper = inspect(model)
        table = cast(Table, mapper.local_table)
        (key,) = table.primary_key.columns
        self.id_attribute = mapper.get_property_by_column(key).key
        self.columns: list[tuple[str, Column[object]]] = [
            (mapper.get_property_by_column(column).key, column)
            for column in table.columns if column is not key]
        self.statement = PreparedStatement(insert(table).values(
            {column.name: bindparam(column.name) for _, column in self.columns}))


_INSERTS: dict[type[Base], _Insert] = {}


def insert_object(connection: Connection, row: Base) -> int:
    """Inserts the transient ``row`` in the connection's transaction; returns its new id.

    Attributes never set take their column's default (evaluated here, as a
    flush would), and are set on ``row`` with its id.
    """
    model = type(row)
    prepared = _INSERTS.get(model)
    if prepared is None:
        prepared = _INSERTS[model] = _Insert(model)
    values = row.__dict__
    params: dict[str, object] = {}
    for attribute, column in prepared.columns:
        if attribute in values:
            params[column.name] = values[attribute]
            continue
        value = _default(column)
        params[column.name] = value
        set_committed_value(row, attribute, value)
    new_id = int(prepared.statement.execute(connection, params).lastrowid)
    set_committed_value(row, prepared.id_attribute, new_id)
    return new_id


def _default(column: Column[object]) -> object:
    """Returns the value a flush would give a column left unset (None without a default)."""
    default = column.default
    if default is None:
        if column.server_default is not None:  # NULL would override it
            raise TypeError(f"column {column.name}: give a value (it has a server default)")
        return None
    arg = getattr(default, "arg", None)
    if getattr(default, "is_callable", False):
        return arg(None)  # type: ignore[misc]  # SQLAlchemy wraps it to take a context
    if getattr(default, "is_scalar", False):
        return arg
    raise TypeError(f"column {column.name}: a {type(default).__name__} default cannot be "
                    "evaluated without a flush")
