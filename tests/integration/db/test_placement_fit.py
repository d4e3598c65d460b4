"""On MariaDB, placement's SQL search finds exactly the hosts its verdicts accept."""

from __future__ import annotations

from hypothesis import given, settings
from sqlalchemy import Engine

from tests.support.placement_worlds import World, load, search_and_verdicts, worlds


@settings(max_examples=40, deadline=None)
@given(world=worlds())
def test_search_finds_exactly_the_hosts_explain_accepts(engine: Engine, world: World) -> None:
    """``find_hosts`` and ``explain`` agree on MariaDB's SQL too (binary names, its planner)."""
    load(engine, world)
    found, fits = search_and_verdicts(engine, world, limit=len(world.hosts) + 1)
    assert found == fits


@settings(max_examples=80, deadline=None)
@given(world=worlds(numa="required"))
def test_search_and_explain_agree_on_numa_required(engine: Engine, world: World) -> None:
    """On MariaDB too, ``required`` keeps exactly the hosts with one NUMA node that fits."""
    load(engine, world)
    found, fits = search_and_verdicts(engine, world, limit=len(world.hosts) + 1)
    assert found == fits
