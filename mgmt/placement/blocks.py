"""Host blocks: which room the Up hosts of each 256 host ids may have, for the search to skip.

``host_blocks`` holds one row per block of ``BLOCK`` host ids (block =
``id >> 8``): ``cells``, a set of bits, one per *cell* of free CPUs and free
memory (each cut in powers of two, ``CPU_STEPS`` and ``MEMORY_STEPS_MB``). A
bit is set for every cell an Up host of the block is in, or was in since the
block was last tightened: an upper bound. A demand fits a host only if the
host's cell is at least the demand's in both dimensions, so placement's host
search reads only the blocks with such a bit (:func:`fitting`); the Up hosts
short of CPU or of memory in the other blocks cost nothing, however many.

The bound may be too high, never too low:

- Whatever makes a host placeable or gives it room sets its bit, in the
  transaction that does it (:func:`raise_host`, :func:`raise_rows`): a host
  registered, announced again or back from maintenance, a VM that stops
  holding CPUs and memory there (``hostdev.mgmt.vms.capacity``). Each such
  write also bumps ``raised``, so it always changes the row: it waits for a
  tightening holding the row (InnoDB) or conflicts with one on another node
  (Galera certification) instead of being lost under it.
- Whatever takes room (a deploy) or takes a host out writes nothing: the bit
  stays until :func:`tighten` recomputes the block from its hosts, under the
  row's lock. A bit too many costs the search a read of the block's hosts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final, cast

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Integer,
    Select,
    Table,
    bindparam,
    case,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.sql.elements import Grouping

from hostdev.mgmt.persistence.database import PreparedStatement
from hostdev.mgmt.persistence.models import HOST_UP, Host, HostBlock
from hostdev.mgmt.persistence.unit_of_work import UnitOfWork

#: Host ids a block spans (``id >> BLOCK_SHIFT``).
BLOCK_SHIFT: Final = 8
BLOCK: Final = 1 << BLOCK_SHIFT
#: Free CPUs from which a host is in the next CPU step (7 steps: 0-1, 2-3, ... 64 and more).
CPU_STEPS: Final = (2, 4, 8, 16, 32, 64)
#: Free memory (MiB) from which a host is in the next memory step (8 steps: < 2 GiB ...
#: 128 GiB and more).
MEMORY_STEPS_MB: Final = (2048, 4096, 8192, 16384, 32768, 65536, 131072)
_MEMORY_CELLS: Final = len(MEMORY_STEPS_MB) + 1
#: Every cell's bit: a block that claims any room (as revision 0013 leaves every block).
ALL_CELLS: Final = (1 << ((len(CPU_STEPS) + 1) * _MEMORY_CELLS)) - 1
#: Blocks tightened per transaction: their hosts are read in one grouped query.
TIGHTEN_BLOCKS: Final = 64
#: Seconds between two tightenings of a management daemon (each the next
#: ``TIGHTEN_BLOCKS`` blocks: 100,000 hosts are gone through in about 35 s).
TIGHTEN_INTERVAL_S: Final = 5.0

_HOSTS = cast(Table, Host.__table__)
_BLOCKS = cast(Table, HostBlock.__table__)


def _step(value: int, steps: tuple[int, ...]) -> int:
    return sum(1 for step in steps if value >= step)


def cell(free_cpus: int, free_memory_mb: int) -> int:
    """Returns the bit of the cell a host with this much room is in."""
    return 1 << (_step(free_cpus, CPU_STEPS) * _MEMORY_CELLS
                 + _step(free_memory_mb, MEMORY_STEPS_MB))


def wanted(cpus: int, memory_mb: int) -> int:
    """Returns the bits of every cell a host that fits ``cpus`` and ``memory_mb`` may be in.

    A host with at least that much room is in a cell at least as high in both
    dimensions (the steps only go up); the converse need not hold.
    """
    low_cpu, low_memory = _step(cpus, CPU_STEPS), _step(memory_mb, MEMORY_STEPS_MB)
    return sum(1 << (c * _MEMORY_CELLS + m)
               for c in range(low_cpu, len(CPU_STEPS) + 1)
               for m in range(low_memory, _MEMORY_CELLS))


def block_of(host_id: int) -> int:
    """Returns the block of a host id."""
    return host_id >> BLOCK_SHIFT


def _step_sql(value: ColumnElement[int], steps: tuple[int, ...]) -> ColumnElement[int]:
    return cast(ColumnElement[int], sum(case((value >= step, 1), else_=0) for step in steps))


def _cell_sql() -> ColumnElement[int]:
    """Returns :func:`cell` of a ``hosts`` row, in SQL."""
    index = (_step_sql(_HOSTS.c.cpus - _HOSTS.c.used_cpus, CPU_STEPS) * _MEMORY_CELLS
             + _step_sql(_HOSTS.c.memory_mb - _HOSTS.c.used_memory_mb, MEMORY_STEPS_MB))
    return literal_column("1").op("<<")(Grouping(index))


def _block_sql() -> ColumnElement[int]:
    return _HOSTS.c.id.op(">>")(BLOCK_SHIFT)


def _upserts(values: Select[*tuple[Any, ...]]) -> dict[str, PreparedStatement]:
    """Returns the statement that ORs ``values``' cells into their blocks, per dialect.

    ``values``: a SELECT of ``(block, cells, raised)`` rows. A block without
    a row gets one. ``raised`` is bumped so the row always changes (see the
    module's text).
    """
    columns = ["block", "cells", "raised"]
    on_mysql = mysql.insert(_BLOCKS).from_select(columns, values)
    on_sqlite = sqlite.insert(_BLOCKS).from_select(columns, values)
    return {
        "mysql": PreparedStatement(on_mysql.on_duplicate_key_update(
            cells=_BLOCKS.c.cells.op("|")(on_mysql.inserted.cells),
            raised=_BLOCKS.c.raised + 1)),
        "sqlite": PreparedStatement(on_sqlite.on_conflict_do_update(
            index_elements=[_BLOCKS.c.block],
            set_={"cells": _BLOCKS.c.cells.op("|")(on_sqlite.excluded.cells),
                  "raised": _BLOCKS.c.raised + 1})),
    }


#: Sets the bit of host ``host_id``'s cell in its block, when it is Up.
_RAISE_HOST = _upserts(select(_block_sql(), _cell_sql(), literal_column("1"))
                       .where(_HOSTS.c.id == bindparam("host_id"), _HOSTS.c.status == HOST_UP))
#: ORs ``cells`` into block ``block``.
_RAISE_BLOCK = _upserts(select(bindparam("block", type_=Integer),
                               bindparam("cells", type_=BigInteger), literal_column("1")))
#: The blocks a tightening takes, locked, in order.
_LOCK_BLOCKS = PreparedStatement(
    select(_BLOCKS.c.block, _BLOCKS.c.cells).where(_BLOCKS.c.block >= bindparam("first"))
    .order_by(_BLOCKS.c.block).limit(TIGHTEN_BLOCKS).with_for_update())
#: The cells of the Up hosts with ids in ``[low, high)``, one row per (block, cell).
_CELLS_OF_HOSTS = PreparedStatement(
    select(_block_sql().label("block"), _cell_sql().label("cell"))
    .where(_HOSTS.c.status == HOST_UP, _HOSTS.c.id >= bindparam("low"),
           _HOSTS.c.id < bindparam("high"))
    .group_by(literal_column("block"), literal_column("cell")))
_SET_CELLS = PreparedStatement(update(_BLOCKS).where(_BLOCKS.c.block == bindparam("b"))
                               .values(cells=bindparam("cells")))
#: The first blocks from ``first`` with a bit of ``want``.
_FITTING = PreparedStatement(
    select(_BLOCKS.c.block)
    .where(_BLOCKS.c.block >= bindparam("first", type_=Integer),
           _BLOCKS.c.cells.op("&")(bindparam("want", type_=BigInteger)) != 0)
    .order_by(_BLOCKS.c.block).limit(bindparam("count", type_=Integer)))


def _dialect(conn: Connection) -> str:
    return "sqlite" if conn.dialect.name == "sqlite" else "mysql"


def raise_host(conn: Connection, host_id: int) -> None:
    """Sets host ``host_id``'s cell in its block (nothing when it is not Up).

    Call it after the change that gave the host room or made it Up, in the
    same transaction: it reads the host's row as that change left it.
    """
    _RAISE_HOST[_dialect(conn)].execute(conn, {"host_id": host_id})


def raise_rows(conn: Connection, hosts: Iterable[tuple[int, int, int]]) -> None:
    """Sets the cells of Up hosts given as ``(id, free CPUs, free memory MiB)``: one
    statement per block, for a batch whose rows the caller holds."""
    cells: dict[int, int] = {}
    for host_id, free_cpus, free_memory_mb in hosts:
        block = block_of(host_id)
        cells[block] = cells.get(block, 0) | cell(free_cpus, free_memory_mb)
    statement = _RAISE_BLOCK[_dialect(conn)]
    for block in sorted(cells):  # one order for every writer: no deadlock between two
        statement.execute(conn, {"block": block, "cells": cells[block]})


def fitting(conn: Connection, after: int, want: int, count: int) -> list[int]:
    """Returns up to ``count`` blocks, in order, that may hold a host after host ``after``
    in a cell of ``want``."""
    rows = _FITTING.execute(conn, {"first": block_of(after + 1), "want": want,
                                   "count": count}).rows
    return [int(block) for (block,) in rows]


def tighten(conn: Connection, first: int) -> int | None:
    """Recomputes up to ``TIGHTEN_BLOCKS`` blocks from ``first`` from their Up hosts.

    Locks the blocks' rows first, then reads the hosts (READ COMMITTED: what
    is committed now). A transaction giving a host room meanwhile either
    raised its block before (the lock waits for its commit, the read sees
    it) or raises it after this commits. Returns the block to go on from,
    None after the last.
    """
    rows = _LOCK_BLOCKS.execute(conn, {"first": first}).rows
    if not rows:
        return None
    last = int(rows[-1][0])
    now: dict[int, int] = {}
    for block, bit in _CELLS_OF_HOSTS.execute(
            conn, {"low": first << BLOCK_SHIFT, "high": (last + 1) << BLOCK_SHIFT}).rows:
        now[int(block)] = now.get(int(block), 0) | int(bit)
    for block, cells in rows:
        if now.get(int(block), 0) != int(cells):
            _SET_CELLS.execute(conn, {"b": int(block), "cells": now.get(int(block), 0)})
    return last + 1


class Tightening:
    """Tightens every block in turn, ``TIGHTEN_BLOCKS`` at a call: a daemon's periodic task."""

    def __init__(self, work: UnitOfWork) -> None:
        self._work = work
        self._first = 0  # the block the next call starts from

    def tighten_next(self) -> None:
        """Tightens the next blocks (from the first again after the last)."""
        first = self._first
        after = self._work.run(lambda tx: tighten(tx.connection, first),
                               what="tighten placement blocks")
        self._first = 0 if after is None else after
