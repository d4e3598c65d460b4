"""Deploys (and start, stop, destroy requests) in batches on MariaDB and SQLite.

A run of such requests runs each request's own route, in order, in ONE
transaction: one COMMIT for all. Two deploys of a run placed on one host
must not share a device nor count its CPUs once: the second runs after the
first in the same transaction and sees its claim. A request refused in a run
(a taken name, no capacity) rolls the run back and every request is handled
alone, so each gets what it would have got alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select

from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.bus.contract import API_QUEUE, Incoming
from hostdev.messages.codec import decode, encode
from hostdev.messages.commands import ErrorAnswer, StartCommand
from hostdev.mgmt.persistence.models import Host, Job, PciDevice, VmInstance
from hostdev.mgmt.service import API_JOINT_KINDS
from tests.support.databases import migrated_engine
from tests.support.mgmt_harness import Harness, devices


@pytest.fixture(params=[pytest.param("mariadb", marks=pytest.mark.mariadb), "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated database: MariaDB or an SQLite file."""
    with migrated_engine(request.param, tmp_path, "hostdev_deploys") as created:
        yield created


def _setup(engine: Engine, hosts: int = 1, per_host: int = 4) -> Harness:
    harness = Harness(engine)
    for n in range(hosts):
        harness.register(f"g{n + 1}", f"h{n + 1}", devices(per_host), cpus=8, memory_mb=8192)
    harness.api(api.CreateOfferingRequest(name="net2", pci_devices="10GE:2", cpus=2,
                                          memory_mb=1024))
    return harness


def _item(harness: Harness, request: Message, *, message_id: str | None = None,
          redelivered: bool = False) -> tuple[Message, Incoming]:
    incoming = harness.incoming(f"api.{type(request).__name__}",
                                reply_to="amq.rabbitmq.reply-to", message_id=message_id)
    return decode(encode(request)), Incoming(**{**incoming.__dict__,
                                                "redelivered": redelivered})


def _deploys(harness: Harness, *names: str) -> list[tuple[Message, Incoming]]:
    return [_item(harness, api.DeployVmRequest(name=name, offering="net2")) for name in names]


def _run(harness: Harness, items: Sequence[tuple[Message, Incoming]]) -> list[Any]:
    """Hands a run to the API queue's batch handler, as the bus would."""
    batching = harness.bus.batches[API_QUEUE][type(items[0][0])]
    assert all(harness.bus.batches[API_QUEUE][kind] is batching for kind in API_JOINT_KINDS)
    return list(batching.handler(items))


def _commits(engine: Engine) -> list[int]:
    count = [0]
    event.listen(engine, "commit", lambda _conn: count.__setitem__(0, count[0] + 1))
    return count


def _held(engine: Engine) -> dict[str, list[str]]:
    """VM name -> the devices it holds (host id and address)."""
    with engine.connect() as conn:
        rows = conn.execute(select(VmInstance.name, PciDevice.host_id, PciDevice.bus,
                                   PciDevice.slot, PciDevice.function)
                            .join(VmInstance, VmInstance.id == PciDevice.instance_id)
                            .order_by(PciDevice.id)).all()
    held: dict[str, list[str]] = {}
    for name, *address in rows:
        held.setdefault(name, []).append(":".join(str(part) for part in address))
    return held


def _used(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        cpus, memory = conn.execute(select(func.sum(Host.used_cpus),
                                           func.sum(Host.used_memory_mb))).one()
    return int(cpus), int(memory)


def _live_vms(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [(name, state) for name, state in conn.execute(
            select(VmInstance.name, VmInstance.state).order_by(VmInstance.id))]


def test_deploys_of_a_run_share_one_commit_and_never_a_device(engine: Engine) -> None:
    """Two deploys of one run on the one host: one COMMIT, disjoint devices, CPUs counted twice."""
    harness = _setup(engine)
    items = _deploys(harness, "a1", "a2")
    commits = _commits(engine)

    results = _run(harness, items)

    assert commits[0] == 1
    assert all(isinstance(r, api.JobAccepted) for r in results), results
    held = _held(engine)
    assert sorted(held) == ["a1", "a2"]
    assert len(held["a1"]) == len(held["a2"]) == 2
    assert not set(held["a1"]) & set(held["a2"])
    assert _used(engine) == (4, 2048)
    starts = [p.message for p in harness.commands(StartCommand)]
    assert len(starts) == 2
    sent = [a for s in starts if isinstance(s, StartCommand) for a in s.vm.pci_devices]
    assert len(set(sent)) == 4
    # Each request's job is the one its answer names, recorded with the request's id.
    with engine.connect() as conn:
        jobs = dict(conn.execute(select(Job.id, Job.request_id)).all())
    assert {r.job_id: incoming.message_id for r, (_, incoming) in zip(results, items,
                                                                        strict=True)} == jobs
    assert harness.answer() == 2
    assert _live_vms(engine) == [("a1", "Running"), ("a2", "Running")]


def test_a_deploy_without_capacity_in_a_run_is_refused_as_alone(engine: Engine) -> None:
    """The host fits two: the third deploy of a run is refused, the first two are placed."""
    harness = _setup(engine)
    results = _run(harness, _deploys(harness, "a1", "a2", "a3"))

    assert [type(r) for r in results] == [api.JobAccepted, api.JobAccepted, ErrorAnswer]
    assert results[2].code == "no_capacity"
    alone = harness.api(api.DeployVmRequest(name="a3", offering="net2"))
    assert isinstance(alone, ErrorAnswer) and alone.details == results[2].details
    assert _live_vms(engine) == [("a1", "Starting"), ("a2", "Starting")]
    assert sorted(_held(engine)) == ["a1", "a2"]
    assert _used(engine) == (4, 2048)


def test_a_name_taken_in_the_same_run_is_refused(engine: Engine) -> None:
    """Two deploys of one name in one run: the first is placed, the second is a conflict."""
    harness = _setup(engine, hosts=2)
    results = _run(harness, _deploys(harness, "a1", "a1"))

    assert isinstance(results[0], api.JobAccepted)
    assert isinstance(results[1], ErrorAnswer) and results[1].code == "conflict"
    assert _live_vms(engine) == [("a1", "Starting")]
    assert _used(engine) == (2, 1024)


@pytest.mark.parametrize("flagged", [True, False], ids=["redelivered", "same-id"])
def test_a_redelivered_deploy_in_a_run_gets_its_job(engine: Engine, flagged: bool) -> None:
    """A deploy accepted before and delivered again in a run gets its job; no second VM."""
    harness = _setup(engine, hosts=2)
    first = harness.api(api.DeployVmRequest(name="a1", offering="net2"), message_id="req-1")
    assert isinstance(first, api.JobAccepted)
    again = _item(harness, api.DeployVmRequest(name="a1", offering="net2"),
                  message_id="req-1", redelivered=flagged)

    results = _run(harness, [_deploys(harness, "a2")[0], again])

    assert isinstance(results[0], api.JobAccepted)
    assert isinstance(results[1], api.JobAccepted)
    assert (results[1].job_id, results[1].vm_uuid) == (first.job_id, first.vm_uuid)
    assert _live_vms(engine) == [("a1", "Starting"), ("a2", "Starting")]
    assert _used(engine) == (4, 2048)


def test_a_mixed_run_runs_each_request_in_order(engine: Engine) -> None:
    """A deploy, a stop and a destroy in one run: one COMMIT, each as it would be alone."""
    harness = _setup(engine, hosts=2)
    for name in ("a1", "a2"):
        assert isinstance(harness.api(api.DeployVmRequest(name=name, offering="net2")),
                          api.JobAccepted)
    assert harness.answer() == 2
    commits = _commits(engine)

    results = _run(harness, [
        *_deploys(harness, "a3"),
        _item(harness, api.StopVmRequest(vm="a1")),
        _item(harness, api.DestroyVmRequest(vm="a2")),
    ])

    assert commits[0] == 1
    assert all(isinstance(r, api.JobAccepted) for r in results), results
    assert _live_vms(engine) == [("a1", "Stopping"), ("a2", "Stopping"), ("a3", "Starting")]
    assert harness.answer() == 3
    assert _live_vms(engine) == [("a1", "Stopped"), ("a2", "Destroyed"), ("a3", "Running")]
    assert sorted(_held(engine)) == ["a3"]
    assert _used(engine) == (2, 1024)
