"""A run of deploys reads its offerings and names in two statements, on MariaDB and SQLite.

From three deploys on, the first deploy of a run reads the offerings the
run names and the live VMs of its names; each deploy takes its rows from
there. What each deploy gets must stay what it gets alone: a name taken
before the run or by a deploy earlier in the run is a conflict, an unknown
offering is refused with the offerings that exist, a destroyed VM's name is
free again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event

from hostdev.messages import api
from hostdev.messages.commands import ErrorAnswer
from tests.integration.mgmt.test_deploy_batches import (
    _commits,
    _deploys,
    _item,
    _live_vms,
    _run,
    _setup,
)
from tests.support.databases import migrated_engine


@pytest.fixture(params=[pytest.param("mariadb", marks=pytest.mark.mariadb), "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated database: MariaDB or an SQLite file."""
    with migrated_engine(request.param, tmp_path, "hostdev_deploy_reads") as created:
        yield created


def _offering_reads(engine: Engine) -> list[str]:
    """The statements that read the offerings table from now on."""
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and \
                "FROM service_offerings" in statement:
            seen.append(statement)
    event.listen(engine, "before_cursor_execute", before)
    return seen


def test_a_run_of_deploys_reads_its_offerings_once(engine: Engine) -> None:
    """Four deploys in a run: the offering is read once, and each VM is placed."""
    harness = _setup(engine, hosts=4)
    reads = _offering_reads(engine)
    commits = _commits(engine)

    results = _run(harness, _deploys(harness, "a1", "a2", "a3", "a4"))

    assert all(isinstance(r, api.JobAccepted) for r in results), results
    assert len(reads) == 1, reads
    assert commits[0] == 1
    assert _live_vms(engine) == [(f"a{n}", "Starting") for n in range(1, 5)]


def test_a_name_taken_earlier_in_a_read_ahead_run_is_refused(engine: Engine) -> None:
    """a1, a2, a1 in one run: the second a1 is a conflict naming the first."""
    harness = _setup(engine, hosts=3)

    results = _run(harness, _deploys(harness, "a1", "a2", "a1"))

    assert [type(r) for r in results] == [api.JobAccepted, api.JobAccepted, ErrorAnswer]
    assert results[2].code == "conflict" and results[0].vm_uuid in results[2].details
    assert _live_vms(engine) == [("a1", "Starting"), ("a2", "Starting")]


def test_a_name_taken_before_the_run_is_refused_as_alone(engine: Engine) -> None:
    """A live VM's name in a run of three: refused with the text it gets alone."""
    harness = _setup(engine, hosts=4)
    before = harness.api(api.DeployVmRequest(name="a0", offering="net2"))
    assert isinstance(before, api.JobAccepted)

    results = _run(harness, _deploys(harness, "a1", "a0", "a2"))

    assert [type(r) for r in results] == [api.JobAccepted, ErrorAnswer, api.JobAccepted]
    alone = harness.api(api.DeployVmRequest(name="a0", offering="net2"))
    assert isinstance(alone, ErrorAnswer) and alone.details == results[1].details


def test_an_unknown_offering_in_a_run_is_refused_with_the_offerings(engine: Engine) -> None:
    """A deploy naming no offering, in a run of three: NotFound listing net2; others placed."""
    harness = _setup(engine, hosts=2)
    items = _deploys(harness, "a1", "a2")
    items.insert(1, _item(harness, api.DeployVmRequest(name="b1", offering="gpu9")))

    results = _run(harness, items)

    assert [type(r) for r in results] == [api.JobAccepted, ErrorAnswer, api.JobAccepted]
    assert results[1].code == "not_found"
    assert "gpu9" in results[1].details and "net2" in results[1].details
    assert _live_vms(engine) == [("a1", "Starting"), ("a2", "Starting")]


def test_a_destroyed_vms_name_is_free_in_a_run(engine: Engine) -> None:
    """A VM destroyed before the run: a deploy of its name in a run of three is placed."""
    harness = _setup(engine, hosts=4)
    assert isinstance(harness.api(api.DeployVmRequest(name="a1", offering="net2")),
                      api.JobAccepted)
    assert harness.answer() == 1
    assert isinstance(harness.api(api.DestroyVmRequest(vm="a1")), api.JobAccepted)
    assert harness.answer() == 1

    results = _run(harness, _deploys(harness, "a1", "a2", "a3"))

    assert all(isinstance(r, api.JobAccepted) for r in results), results
    assert _live_vms(engine) == [("a1", "Destroyed"), ("a1", "Starting"), ("a2", "Starting"),
                                 ("a3", "Starting")]
