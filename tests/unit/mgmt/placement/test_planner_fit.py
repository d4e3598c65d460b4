"""Property tests: placement's SQL search finds exactly the hosts its verdicts accept."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from sqlalchemy import Engine, select

from hostdev.mgmt.devices import host_rules
from hostdev.mgmt.devices.availability import choose
from hostdev.mgmt.persistence.models import Host
from hostdev.mgmt.placement import planner
from tests.support.placement_worlds import World, load, search_and_verdicts, worlds

# One migrated SQLite file per test; each example replaces its rows.
_SETTINGS = settings(max_examples=150, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(world=worlds())
def test_search_finds_exactly_the_hosts_explain_accepts(engine: Engine, world: World) -> None:
    """Within one page, ``find_hosts`` returns every accepted host, in first-fit order."""
    load(engine, world)
    found, fits = search_and_verdicts(engine, world, limit=len(world.hosts) + 1)
    assert found == fits


@_SETTINGS
@given(world=worlds(numa="required"))
def test_search_and_explain_agree_on_numa_required(engine: Engine, world: World) -> None:
    """With policy ``required`` the search keeps exactly the hosts with one node that fits."""
    load(engine, world)
    found, fits = search_and_verdicts(engine, world, limit=len(world.hosts) + 1)
    assert found == fits


@_SETTINGS
@given(world=worlds(max_hosts=10, numa="required"))
def test_paged_numa_search_returns_a_first_fit_prefix(engine: Engine, world: World,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages of two hosts keep the first-name prefilter sound under policy ``required``."""
    monkeypatch.setattr(planner, "PAGE", 2)
    load(engine, world)
    found, fits = search_and_verdicts(engine, world, limit=len(world.hosts) + 1)
    assert bool(found) == bool(fits)
    assert found == fits[:len(found)]


@_SETTINGS
@given(world=worlds(max_hosts=10))
def test_paged_search_returns_a_first_fit_prefix(engine: Engine, world: World,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With pages of two hosts, the search still finds a host iff one fits, first fit first."""
    monkeypatch.setattr(planner, "PAGE", 2)
    load(engine, world)
    found, fits = search_and_verdicts(engine, world, limit=len(world.hosts) + 1)
    assert bool(found) == bool(fits)
    assert found == fits[:len(found)]
    assert search_and_verdicts(engine, world, limit=1)[0] == fits[:1]


@_SETTINGS
@given(world=worlds(roomy=True))
def test_a_host_the_search_finds_can_take_the_claim(engine: Engine, world: World) -> None:
    """Under the hardware rules, a claim can take the demand on every host the search finds.

    Left out: hosts with a free PF and a free VF of it, where one demand
    could need both (documented: such a host fits by count, the claim refuses).
    """
    load(engine, world)
    found, _ = search_and_verdicts(engine, world, limit=len(world.hosts) + 1)
    requests = {r.name: r.count for r in world.demand.pci}
    with engine.connect() as conn:
        ids = dict(conn.execute(select(Host.name, Host.id)).all())
        for name in found:
            facts = host_rules.read_facts(conn, ids[name])
            free = {f.address for f in facts if f.state == "free"}
            if any(f.physical_function in free for f in facts if f.address in free):
                continue
            assert choose(facts, requests).short is None, name
