"""Every way a host becomes placeable sets its cell in placement's blocks, on MariaDB and SQLite.

Each test first makes the host unplaceable and tightens the blocks (so its
block no longer claims the host's room), then takes one path back: the
search must find the host again. Without the path's raise, the block would
hide it until the next tightening.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from hostdev.messages import api
from hostdev.mgmt.persistence.models import Host, HostBlock
from hostdev.mgmt.placement import blocks
from hostdev.mgmt.placement.planner import Demand, find_hosts
from tests.integration.mgmt.test_restart_batches import _silent, _startup, _taken
from tests.support.databases import migrated_engine, uncovered_hosts
from tests.support.mgmt_harness import Harness, devices

#: All the room a host of ``_startup`` has.
WHOLE_HOST = Demand(cpus=48, memory_mb=196608)


@pytest.fixture(params=[pytest.param("mariadb", marks=pytest.mark.mariadb), "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated database: MariaDB or an SQLite file."""
    with migrated_engine(request.param, tmp_path, "hostdev_block_paths") as created:
        yield created


def _found(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return [c.guid for c in find_hosts(session, WHOLE_HOST, limit=20)]


def _hidden(engine: Engine, harness: Harness) -> None:
    """Tightens every block (what the daemon does every few seconds)."""
    harness.service.blocks.tighten_next()
    with engine.connect() as conn:
        assert conn.execute(select(HostBlock.block)).first() is not None


def test_new_hosts_registered_in_a_batch_are_placeable(engine: Engine) -> None:
    """The start-up batch inserts new hosts in bulk: their blocks claim their room."""
    harness = Harness(engine)
    answers = _taken(harness, _startup("n1", devices(2)), _startup("n2", devices(2)))
    assert all(not isinstance(a, bool) for a in answers)
    assert _found(engine) == ["n1", "n2"]


def test_a_known_host_announcing_itself_again_is_placeable(engine: Engine) -> None:
    """Disconnected and tightened out, then its agent restarts: alone and in a batch."""
    harness = Harness(engine)
    for guid in ("k1", "k2"):
        harness.from_agent(guid, _startup(guid, devices(2)))
    _silent(engine, harness, "k1", "k2")
    _hidden(engine, harness)
    assert _found(engine) == []
    # Each on its own: both hosts share a block, so one's raise would cover the other.
    taken = _taken(harness, _startup("k2", devices(2), boot="boot-2"))  # in the batch
    assert len(taken) == 1 and not isinstance(taken[0], bool)
    assert _found(engine) == ["k2"]
    harness.from_agent("k1", _startup("k1", devices(2), boot="boot-2"))  # alone
    assert _found(engine) == ["k1", "k2"]


def test_a_disconnected_host_that_pings_again_is_placeable(engine: Engine) -> None:
    """A ping brings a Disconnected host back Up: its block claims its room again."""
    harness = Harness(engine)
    harness.register("p1", cpus=48, memory_mb=196608)
    _silent(engine, harness, "p1")
    _hidden(engine, harness)
    assert _found(engine) == []
    harness.ping("p1")
    assert _found(engine) == ["p1"]


def test_a_host_activated_out_of_maintenance_is_placeable(engine: Engine) -> None:
    """Maintenance (with no VM it is reached at once), tightened out, then activated."""
    harness = Harness(engine)
    harness.register("m1", cpus=48, memory_mb=196608)
    harness.api(api.HostMaintenanceRequest(host="m1"))
    harness.service.sweep_hosts()
    with engine.connect() as conn:
        assert conn.execute(select(Host.status).where(Host.guid == "m1")).scalar_one() in (
            "Maintenance", "PrepareForMaintenance")
    _hidden(engine, harness)
    assert _found(engine) == []
    harness.api(api.ActivateHostRequest(host="m1"))
    assert _found(engine) == ["m1"]


def test_a_host_announcing_more_room_is_placeable_for_it(engine: Engine) -> None:
    """A host re-registered with more CPUs and memory: a VM asking for them finds it."""
    harness = Harness(engine)
    harness.register("r1", cpus=8, memory_mb=8192)
    _hidden(engine, harness)
    assert _found(engine) == []
    harness.register("r1", cpus=48, memory_mb=196608)
    assert _found(engine) == ["r1"]
    with engine.begin() as conn:
        conn.execute(update(Host).values(status="Down"))
        assert blocks.tighten(conn, 0) is not None
        assert uncovered_hosts(conn) == []
    assert _found(engine) == []
