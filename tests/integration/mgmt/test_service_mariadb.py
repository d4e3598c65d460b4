"""ManagementService on MariaDB: placement, races between daemons, jobs across daemons."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from hostdev.messages import api
from hostdev.messages.commands import ErrorAnswer, StartAnswer, StartCommand
from hostdev.mgmt.persistence.database import create_database_engine
from hostdev.mgmt.persistence.models import PciDevice, VmInstance
from tests.support.databases import mariadb_database
from tests.support.mgmt_harness import Harness, devices

pytestmark = pytest.mark.mariadb


@pytest.fixture
def engine() -> Iterator[Engine]:
    """A fresh migrated MariaDB database per test, dropped afterwards."""
    with mariadb_database("hostdev_mgmt") as url:
        engine = create_database_engine(url, pool_size=8)
        yield engine
        engine.dispose()


def _setup(engine: Engine, hosts: int, per_host: int) -> Harness:
    harness = Harness(engine)
    for n in range(hosts):
        harness.register(f"g{n + 1}", f"h{n + 1}", devices(per_host))
    harness.api(api.CreateOfferingRequest(name="net2", pci_devices="10GE,10GE"))
    return harness


def _device_holders(engine: Engine) -> list[tuple[int, int]]:
    with Session(engine) as session:
        return [(vm, n) for vm, n in session.execute(
            select(PciDevice.instance_id, func.count()).where(PciDevice.instance_id.is_not(None))
            .group_by(PciDevice.instance_id))]


def test_deploy_until_full_then_clear_refusal(engine: Engine) -> None:
    """Deploys fill h1 then h2 first fit; the next is refused with each host's count."""
    h = _setup(engine, 3, 3)
    for n in range(3):
        assert isinstance(h.api(api.DeployVmRequest(name=f"vm{n}", offering="net2")),
                          api.JobAccepted)
    h.answer()
    answer = h.api(api.DeployVmRequest(name="vm9", offering="net2"))
    assert isinstance(answer, ErrorAnswer)
    assert answer.details == "no host has 2 x 10GE free: h1 has 1, h2 has 1, h3 has 1"
    assert sorted(n for _, n in _device_holders(engine)) == [2, 2, 2]


def test_two_daemons_racing_never_share_a_device(engine: Engine) -> None:
    """Two services deploying at once on one database hand out each device once."""
    hosts, per_host = 6, 4  # 12 pairs of devices
    first = _setup(engine, hosts, per_host)
    second = Harness(engine)
    results: dict[str, list[object]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def deploy(harness: Harness, tag: str) -> None:
        barrier.wait()
        for n in range(10):
            results[tag].append(harness.api(api.DeployVmRequest(name=f"{tag}{n}",
                                                                offering="net2")))

    threads = [threading.Thread(target=deploy, args=(first, "a")),
               threading.Thread(target=deploy, args=(second, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    answers = results["a"] + results["b"]
    accepted = [a for a in answers if isinstance(a, api.JobAccepted)]
    refused = [a for a in answers if isinstance(a, ErrorAnswer)]
    assert len(accepted) == hosts * per_host // 2
    assert all(a.code == "no_capacity" for a in refused), refused  # type: ignore[union-attr]
    holders = _device_holders(engine)
    assert len(holders) == len(accepted) and all(n == 2 for _, n in holders)


def test_another_daemon_finishes_a_job(engine: Engine) -> None:
    """A job begun by one daemon is finished by another that gets the agent's answer."""
    starter = _setup(engine, 1, 2)
    finisher = Harness(engine)
    accepted = starter.api(api.DeployVmRequest(name="vm1", offering="net2"))
    assert isinstance(accepted, api.JobAccepted)
    command = starter.commands(StartCommand)[0]
    assert isinstance(command.message, StartCommand)
    finisher.from_agent("g1", StartAnswer(vm_uuid=command.message.vm.uuid,
                                          hostdevs=command.message.vm.pci_devices),
                        correlation_id=command.message_id)
    job = finisher.api(api.GetJobRequest(job_id=accepted.job_id))
    assert isinstance(job, api.JobList) and job.jobs[0].state == "succeeded"
    with Session(engine) as session:
        assert session.scalar(select(VmInstance.state)) == "Running"
