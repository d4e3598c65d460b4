"""Placement's blocks on both back ends: what the search skips, bounds too high, tightening,
and (MariaDB) room given back while a tightening runs is never lost."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, insert, select, text, update
from sqlalchemy.orm import Session

from hostdev.mgmt.persistence.models import Host, HostBlock, VmInstance
from hostdev.mgmt.placement import blocks
from hostdev.mgmt.placement.planner import Demand, find_hosts
from hostdev.mgmt.vms import capacity
from tests.support.databases import (
    add_offering,
    migrated_engine,
    raise_blocks,
    uncovered_hosts,
)
from tests.support.waiting import wait_for

FOUR_CPUS = Demand(cpus=4, memory_mb=4096)


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated database on each back end."""
    with migrated_engine(request.param, tmp_path, "hostdev_blocks") as engine:
        yield engine


@pytest.fixture
def mariadb(tmp_path: Path) -> Iterator[Engine]:
    """A migrated MariaDB database (row locks are what the tests are about)."""
    with migrated_engine("mariadb", tmp_path, "hostdev_blocks") as engine:
        yield engine


def _hosts(conn: Connection, specs: list[tuple[str, int, int]]) -> list[int]:
    """Inserts hosts ``(status, cpus, used_cpus)`` with 64 GiB free each, ids 1, 2, ...;
    sets their blocks as their registrations would."""
    conn.execute(insert(Host), [
        {"id": n, "guid": f"g{n}", "name": f"h{n}", "status": status, "cpus": cpus,
         "used_cpus": used, "memory_mb": 65536, "used_memory_mb": 0, "hypervisor_version": ""}
        for n, (status, cpus, used) in enumerate(specs, start=1)])
    raise_blocks(conn)
    return list(range(1, len(specs) + 1))


def _cells(engine: Engine) -> dict[int, int]:
    with engine.connect() as conn:
        return {int(b): int(c) for b, c in conn.execute(select(HostBlock.block, HostBlock.cells))}


def _found(engine: Engine, demand: Demand = FOUR_CPUS) -> list[int]:
    with Session(engine) as session:
        return [c.id for c in find_hosts(session, demand)]


def test_the_search_reads_only_blocks_where_a_host_may_have_the_room(db: Engine) -> None:
    """Three blocks of Up hosts short of CPU (and Down hosts with room), then one host that
    fits: only its block may fit, and the search finds it and nothing before it."""
    short = [("Up", 4, 2) if n % 2 else ("Down", 64, 0) for n in range(3 * blocks.BLOCK)]
    with db.begin() as conn:
        ids = _hosts(conn, [*short, ("Up", 8, 2), ("Up", 4, 2)])
        want = blocks.wanted(FOUR_CPUS.cpus, FOUR_CPUS.memory_mb)
        assert blocks.fitting(conn, 0, want, 10) == [blocks.block_of(ids[-2])] == [3]
    assert _found(db) == [ids[-2]]


def test_a_bound_too_high_costs_reads_and_hides_no_host(db: Engine) -> None:
    """Every block claiming every cell (as right after the upgrade): the same first fits."""
    specs = [("Up", 4, 2)] * 600 + [("Up", 8, 0)] * 3
    with db.begin() as conn:
        ids = _hosts(conn, specs)
    exact = _found(db)
    assert exact == ids[600:]
    with db.begin() as conn:
        conn.execute(update(HostBlock).values(cells=blocks.ALL_CELLS))
    assert _found(db) == exact


def test_tightening_sets_each_block_from_its_up_hosts_only(db: Engine) -> None:
    """After hosts lost their room or went Down, a tightening leaves in each block the cells
    of its Up hosts: a block with none is skipped, and no Up host is left out."""
    specs = [("Up", 64, 0)] * blocks.BLOCK + [("Up", 64, 0)] * 10
    with db.begin() as conn:
        ids = _hosts(conn, specs)
        conn.execute(update(Host).where(Host.id <= 200).values(used_cpus=62))
        conn.execute(update(Host).where(Host.id > 200).values(status="Down"))
        assert blocks.tighten(conn, 0) == 2  # blocks 0 and 1: go on from 2
        assert blocks.tighten(conn, 2) is None
        assert uncovered_hosts(conn) == []
    assert _cells(db) == {0: blocks.cell(2, 65536), 1: 0}
    assert _found(db) == []
    with db.begin() as conn:  # a host Up again sets its cell, as registration does
        conn.execute(update(Host).where(Host.id == ids[-1]).values(status="Up"))
        blocks.raise_host(conn, ids[-1])
    assert _found(db) == [ids[-1]]


def test_room_given_back_sets_the_cell_and_room_taken_waits_for_the_tightening(
        db: Engine) -> None:
    """A VM started on an empty host takes its room: the block keeps the old cell (a bound
    too high) until tightened; the VM stopping gives the room back and sets it again."""
    with db.begin() as conn:
        (host,) = _hosts(conn, [("Up", 4, 0)])
        offering = add_offering(conn, cpus=4, memory_mb=4096)
        vm_id = conn.execute(insert(VmInstance).values(
            uuid="u1", name="vm1", offering_id=offering, state="Stopped", cpus=4,
            memory_mb=4096)).inserted_primary_key[0]
    empty = blocks.cell(4, 65536)
    with Session(db) as session, session.begin():
        vm = session.get(VmInstance, vm_id)
        assert vm is not None
        capacity.moved(session.connection(), vm, (None, "Stopped"), (host, "Running"))
    assert _cells(db) == {0: empty} and _found(db) == []  # the host refuses, not the block
    with db.begin() as conn:
        blocks.tighten(conn, 0)
    assert _cells(db) == {0: blocks.cell(0, 61440)} and _found(db) == []
    with Session(db) as session, session.begin():
        vm = session.get(VmInstance, vm_id)
        assert vm is not None
        capacity.moved(session.connection(), vm, (host, "Running"), (None, "Stopped"))
    assert _cells(db)[0] & empty and _found(db) == [host]


def _waiting_for_a_lock(engine: Engine, connection_id: int) -> bool:
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT COUNT(*) FROM information_schema.INNODB_TRX "
            "WHERE trx_mysql_thread_id = :id AND trx_state = 'LOCK WAIT'"),
            {"id": connection_id}).scalar_one() == 1


def _give_room_back(conn: Connection, host: int) -> None:
    """What a stop does to its host: less used, then the block raised."""
    conn.execute(update(Host).where(Host.id == host).values(used_cpus=0))
    blocks.raise_host(conn, host)


def _in_thread(engine: Engine,
               work: Callable[[Connection], object]) -> tuple[threading.Thread, list[int]]:
    """Runs ``work(conn)`` in a transaction on another thread; returns it and its
    connection id (once known)."""
    ids: list[int] = []

    def run() -> None:
        with engine.begin() as conn:
            ids.append(int(conn.execute(text("SELECT CONNECTION_ID()")).scalar_one()))
            work(conn)
    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: bool(ids), timeout=10, what="the other transaction")
    return thread, ids


@pytest.mark.mariadb
def test_a_tightening_waits_for_room_given_back_before_it_and_keeps_it(
        mariadb: Engine) -> None:
    """A stop gave a full host its room back and raised the block, not yet committed; a
    tightening starts: it waits on the block's row, then reads the host as committed."""
    with mariadb.begin() as conn:
        (host,) = _hosts(conn, [("Up", 8, 8)])
        blocks.tighten(conn, 0)
    free = blocks.cell(8, 65536)
    assert not _cells(mariadb)[0] & free
    with mariadb.connect() as giving:
        giving.begin()
        _give_room_back(giving, host)
        thread, ids = _in_thread(mariadb, lambda conn: blocks.tighten(conn, 0))
        wait_for(lambda: _waiting_for_a_lock(mariadb, ids[0]), timeout=10,
                 what="the tightening waiting on the block")
        giving.commit()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert _cells(mariadb)[0] & free
    assert _found(mariadb, Demand(cpus=8, memory_mb=1024)) == [host]


@pytest.mark.mariadb
def test_room_given_back_during_a_tightening_is_set_after_it(mariadb: Engine) -> None:
    """A tightening holds the block (it read the host still full); a stop gives the host its
    room back meanwhile: its raise waits for the tightening and sets the cell after it."""
    with mariadb.begin() as conn:
        (host,) = _hosts(conn, [("Up", 8, 8)])
        conn.execute(update(HostBlock).values(cells=blocks.ALL_CELLS))
    free = blocks.cell(8, 65536)
    with mariadb.connect() as tightening:
        tightening.begin()
        blocks.tighten(tightening, 0)
        thread, ids = _in_thread(mariadb, lambda conn: _give_room_back(conn, host))
        wait_for(lambda: _waiting_for_a_lock(mariadb, ids[0]), timeout=10,
                 what="the stop waiting on the block")
        tightening.commit()  # without the host's room: it had not committed
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert _cells(mariadb)[0] & free
    assert _found(mariadb, Demand(cpus=8, memory_mb=1024)) == [host]
