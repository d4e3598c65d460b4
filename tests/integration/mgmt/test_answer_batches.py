"""Agent answers and lifecycle reports in batches on MariaDB and SQLite: one COMMIT, same work.

A run of start and stop answers and lifecycle reports runs each message's
own route in ONE transaction. The rows, events and answers must be those of
the messages handled one by one; a forged message is refused alone; a
redelivery (flagged or not) changes nothing; a transaction retried after a
lost race applies nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select

from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.bus.contract import MGMT_QUEUE, Incoming
from hostdev.messages.codec import decode, encode
from hostdev.messages.commands import StartAnswer, StartCommand, VmStateReport
from hostdev.mgmt.errors import Forbidden
from hostdev.mgmt.persistence.database import RetryTransaction
from hostdev.mgmt.persistence.models import Job, PciDevice, VmInstance
from hostdev.mgmt.service import JOINT_KINDS
from tests.support.databases import migrated_engine
from tests.support.mgmt_harness import Harness, devices

#: Columns that differ between two VMs deployed alike (identity and time).
_VM_IDENTITY = {"id", "uuid", "name", "created_at", "updated_at", "host_id", "state_since",
                "started_at", "stopped_at"}
_JOB_IDENTITY = {"id", "vm_id", "created_at", "updated_at", "finished_at", "deadline",
                 "payload", "request_id", "command_id", "host_id",
                 "details", "command_host"}  # the host it ran on


@pytest.fixture(params=[pytest.param("mariadb", marks=pytest.mark.mariadb), "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated database: MariaDB or an SQLite file."""
    with migrated_engine(request.param, tmp_path, "hostdev_answers") as created:
        yield created


def _setup(engine: Engine, hosts: int) -> Harness:
    harness = Harness(engine)
    for n in range(hosts):
        harness.register(f"g{n + 1}", f"h{n + 1}", devices(4))
    harness.api(api.CreateOfferingRequest(name="net1", pci_devices="10GE"))
    return harness


def _deploy(harness: Harness, *names: str) -> None:
    for name in names:
        assert isinstance(harness.api(api.DeployVmRequest(name=name, offering="net1")),
                          api.JobAccepted)


def _start_answers(harness: Harness) -> list[tuple[Message, Incoming]]:
    """The agents' answers to the start commands not answered yet, as deliveries."""
    items: list[tuple[Message, Incoming]] = []
    for published in harness.commands(StartCommand):
        guid = published.routing_key.split(".")[1]
        command = published.message
        assert isinstance(command, StartCommand)
        harness.answered.add(published.message_id)
        answer = StartAnswer(vm_uuid=command.vm.uuid, hostdevs=command.vm.pci_devices)
        items.append((decode(encode(answer)), harness.incoming(
            f"mgmt.{guid}.StartAnswer", correlation_id=published.message_id)))
    return items


def _run(harness: Harness, items: Sequence[tuple[Message, Incoming]]) -> Sequence[Any]:
    """Hands a run to the service's batch handler, as the bus would."""
    batching = harness.bus.batches[MGMT_QUEUE][type(items[0][0])]
    assert all(harness.bus.batches[MGMT_QUEUE][kind] is batching for kind in JOINT_KINDS)
    return batching.handler(items)


def _commits(engine: Engine) -> list[int]:
    count = [0]
    event.listen(engine, "commit", lambda _conn: count.__setitem__(0, count[0] + 1))
    return count


def _vm(engine: Engine, name: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(select(VmInstance.__table__)
                                 .where(VmInstance.name == name)).one()._mapping)


def _jobs(engine: Engine, vm_id: int) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(
            select(Job.__table__).where(Job.vm_id == vm_id).order_by(Job.id))]


def _held(engine: Engine, vm_id: int) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(PciDevice.state).where(PciDevice.instance_id == vm_id)))


def _without(row: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in keys}


def _vm_events(harness: Harness, engine: Engine, name: str) -> list[str]:
    """The routing keys of a VM's events, its uuid replaced by ``<vm>``."""
    uuid = _vm(engine, name)["uuid"]
    return [key.replace(uuid, "<vm>") for key in harness.events() if uuid in key]


def _same_as_alone(harness: Harness, engine: Engine, batched: str, alone: str) -> None:
    vm, twin = _vm(engine, batched), _vm(engine, alone)
    assert _without(vm, _VM_IDENTITY) == _without(twin, _VM_IDENTITY)
    assert [_without(j, _JOB_IDENTITY) for j in _jobs(engine, vm["id"])] \
        == [_without(j, _JOB_IDENTITY) for j in _jobs(engine, twin["id"])]
    assert _held(engine, vm["id"]) == _held(engine, twin["id"])
    assert _vm_events(harness, engine, batched) == _vm_events(harness, engine, alone)


def test_a_run_of_start_answers_is_applied_in_one_commit_as_alone(engine: Engine) -> None:
    """Rows, jobs, devices and events of answers run together equal those of answers alone."""
    harness = _setup(engine, 3)
    _deploy(harness, "a1", "a2", "a3")
    assert harness.answer() == 3
    _deploy(harness, "b1", "b2", "b3")
    items = _start_answers(harness)
    commits = _commits(engine)

    results = _run(harness, items)

    assert list(results) == [None, None, None]
    assert commits[0] == 1
    for batched, alone in (("b1", "a1"), ("b2", "a2"), ("b3", "a3")):
        assert _vm(engine, batched)["state"] == "Running"
        _same_as_alone(harness, engine, batched, alone)


def test_answers_and_reports_of_one_vm_in_a_run_keep_their_order(engine: Engine) -> None:
    """A start answer then its VM's lifecycle report, in one run, end as they would alone."""
    harness = _setup(engine, 1)
    _deploy(harness, "a1")
    sent, incoming = _start_answers(harness)[0]
    assert isinstance(sent, StartAnswer)
    # Numbered as the agent numbers them: the report comes after the answer.
    answer = decode(encode(StartAnswer(vm_uuid=sent.vm_uuid, hostdevs=sent.hostdevs,
                                       boot_id="b1", seq=1)))
    report = VmStateReport(guid="g1", vm_uuid=sent.vm_uuid, vm_name="a1", state="stopped",
                           event="Stopped/Destroyed", boot_id="b1", seq=2)
    items = [(answer, incoming),
             (decode(encode(report)), harness.incoming("mgmt.g1.VmStateReport"))]

    assert list(_run(harness, items)) == [None, None]

    assert _vm(engine, "a1")["state"] == "Stopped"
    assert [_without(j, _JOB_IDENTITY)["state"] for j in _jobs(engine, _vm(engine, "a1")["id"])] \
        == ["succeeded"]


def test_a_forged_answer_in_a_run_is_refused_alone(engine: Engine) -> None:
    """An answer sent by another host's agent user is refused; the others are applied."""
    harness = _setup(engine, 3)
    _deploy(harness, "a1", "a2", "a3")
    items = _start_answers(harness)
    forged = [1]
    items[1] = (items[1][0], Incoming(**{**items[1][1].__dict__, "user_id": "agent-g9"}))

    results = _run(harness, items)

    assert isinstance(results[forged[0]], Forbidden) and "agent-g9" in str(results[forged[0]])
    states = {name: _vm(engine, name)["state"] for name in ("a1", "a2", "a3")}
    forged_name = _vm_name(engine, items[forged[0]][0])
    assert states.pop(forged_name) == "Starting"
    assert set(states.values()) == {"Running"}
    assert [r for index, r in enumerate(results) if index != forged[0]] == [None, None]


@pytest.mark.parametrize("flagged", [True, False], ids=["redelivered", "same-id"])
def test_a_redelivered_answer_in_a_run_changes_nothing(engine: Engine, flagged: bool) -> None:
    """An answer handled before, delivered again in a run, is dropped; the others apply."""
    harness = _setup(engine, 2)
    _deploy(harness, "a1", "a2", "a3")
    first, *rest = _start_answers(harness)
    handler = harness.bus.consumers[MGMT_QUEUE][StartAnswer]
    assert handler(*first) is None
    events = len(harness.events())
    again = (first[0], Incoming(**{**first[1].__dict__, "redelivered": flagged}))

    results = _run(harness, [rest[0], again, rest[1]])

    assert list(results) == [None, None, None]
    for name in ("a1", "a2", "a3"):
        assert _vm(engine, name)["state"] == "Running"
        assert [j["state"] for j in _jobs(engine, _vm(engine, name)["id"])] == ["succeeded"]
    # The first VM's events are not published again: only the two others' are new.
    new = harness.events()[events:]
    first_uuid = str(first[0].vm_uuid)  # type: ignore[attr-defined]
    assert new and not any(first_uuid in key for key in new)


def test_a_run_retried_after_a_lost_race_applies_nothing_twice(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose transaction is retried (a deadlock) ends as if it had run once."""
    harness = _setup(engine, 2)
    _deploy(harness, "a1", "a2")
    items = _start_answers(harness)
    jobs = harness.service.jobs
    original = jobs.on_start_answer
    calls = [0]

    def lose_once(*args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        original(*args, **kwargs)
        if calls[0] == 2:  # the second answer, in the first attempt: after both ran
            raise RetryTransaction("lost a race (test)")

    monkeypatch.setattr(jobs, "on_start_answer", lose_once)
    events = len(harness.events())

    assert list(_run(harness, items)) == [None, None]

    assert calls[0] == 4  # both answers, twice: the run was retried as a whole
    for name in ("a1", "a2"):
        assert _vm(engine, name)["state"] == "Running"
        assert [j["state"] for j in _jobs(engine, _vm(engine, name)["id"])] == ["succeeded"]
    new = harness.events()[events:]
    assert len(new) == len(set(new))


def _vm_name(engine: Engine, answer: Message) -> str:
    with engine.connect() as conn:
        return str(conn.scalar(select(VmInstance.name).where(
            VmInstance.uuid == answer.vm_uuid)))  # type: ignore[attr-defined]
