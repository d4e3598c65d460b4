"""A run of answers reads the jobs of all its commands in one statement, on MariaDB and SQLite.

The first answer of a run locks and reads the jobs (and VMs) of every
command the run's answers correlate to; each answer then takes its own row
once. What each answer does must stay what it does alone: an answer
repeated in the run reads its job again (and finds it finished), an answer
correlating to no command is refused alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event

from hostdev.messages import api
from hostdev.messages.bus.contract import Incoming
from hostdev.mgmt.errors import ForgedAnswer
from tests.integration.mgmt.test_answer_batches import _commits, _jobs, _run, _start_answers, _vm
from tests.support.databases import migrated_engine
from tests.support.mgmt_harness import Harness, devices


@pytest.fixture(params=[pytest.param("mariadb", marks=pytest.mark.mariadb), "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated database: MariaDB or an SQLite file."""
    with migrated_engine(request.param, tmp_path, "hostdev_read_ahead") as created:
        yield created


def _deployed(engine: Engine, *names: str) -> Harness:
    harness = Harness(engine)
    for n in range(2):
        harness.register(f"g{n + 1}", f"h{n + 1}", devices(4))
    harness.api(api.CreateOfferingRequest(name="net1", pci_devices="10GE"))
    for name in names:
        assert isinstance(harness.api(api.DeployVmRequest(name=name, offering="net1")),
                          api.JobAccepted)
    return harness


def _job_reads(engine: Engine) -> list[str]:
    """The statements that read the jobs table from now on."""
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM jobs" in statement:
            seen.append(statement)
    event.listen(engine, "before_cursor_execute", before)
    return seen


def test_a_run_of_answers_reads_their_jobs_in_one_statement(engine: Engine) -> None:
    """Four start answers: one read of the jobs table, and each VM Running as alone."""
    harness = _deployed(engine, "a1", "a2", "a3", "a4")
    items = _start_answers(harness)
    reads = _job_reads(engine)

    assert list(_run(harness, items)) == [None] * 4

    assert len(reads) == 1, reads
    for name in ("a1", "a2", "a3", "a4"):
        vm = _vm(engine, name)
        assert vm["state"] == "Running" and vm["update_count"] == 2
        assert [job["state"] for job in _jobs(engine, vm["id"])] == ["succeeded"]


def test_an_answer_repeated_in_a_run_under_a_new_id_is_late(engine: Engine) -> None:
    """The same answer twice in a run (two message ids): the second finds its job finished."""
    harness = _deployed(engine, "a1", "a2")
    first, second = _start_answers(harness)
    again = (first[0], Incoming(**{**first[1].__dict__, "message_id": "m-again"}))
    commits = _commits(engine)

    assert list(_run(harness, [first, second, again])) == [None, None, None]

    assert commits[0] == 1  # the run was not undone and redone alone
    vm = _vm(engine, "a1")
    assert vm["state"] == "Running" and vm["update_count"] == 2  # one transition
    assert [job["state"] for job in _jobs(engine, vm["id"])] == ["succeeded"]
    assert len(harness.events(f"vm.{vm['uuid']}.Running")) == 1


def test_an_answer_to_no_command_in_a_run_is_refused_alone(engine: Engine) -> None:
    """A guessed correlation id among read-ahead answers: refused; the others apply."""
    harness = _deployed(engine, "a1", "a2", "a3")
    items = _start_answers(harness)
    message, incoming = items[1]
    items[1] = (message, Incoming(**{**incoming.__dict__, "correlation_id": "guessed-0001"}))

    results = _run(harness, items)

    assert isinstance(results[1], ForgedAnswer)
    assert "guessed-0001" in str(results[1]) and "no command" in str(results[1])
    assert results[0] is None and results[2] is None
    states = sorted(_vm(engine, name)["state"] for name in ("a1", "a2", "a3"))
    assert states == ["Running", "Running", "Starting"]
