"""On MariaDB, ``hosts.used_cpus``/``used_memory_mb`` follow every VM operation that holds or
frees them: deploy, a failed start, stop, start, migrate, destroy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from hostdev.messages import api
from hostdev.messages.commands import StartCommand
from hostdev.mgmt.persistence.database import create_database_engine
from hostdev.mgmt.persistence.models import Host, VmInstance
from hostdev.mgmt.vms.vm_states import HOLDS_DEVICES
from tests.support.broker_cloud import BrokerCloud, broker_cloud
from tests.support.databases import mariadb_database
from tests.support.mgmt_harness import Harness, devices

pytestmark = pytest.mark.mariadb


def _used(engine: Engine) -> dict[str, tuple[int, int]]:
    """Returns each host's ``used_*``, after checking they are the sums over its VMs."""
    with engine.connect() as conn:
        used = {name: (cpus, memory) for name, cpus, memory in conn.execute(
            select(Host.name, Host.used_cpus, Host.used_memory_mb))}
        sums = {name: (int(cpus), int(memory)) for name, cpus, memory in conn.execute(
            select(Host.name, func.sum(VmInstance.cpus), func.sum(VmInstance.memory_mb))
            .join(VmInstance, VmInstance.host_id == Host.id)
            .where(VmInstance.state.in_(HOLDS_DEVICES)).group_by(Host.name))}
    assert used == {name: sums.get(name, (0, 0)) for name in used}
    return used


@pytest.fixture
def engine() -> Iterator[Engine]:
    """A fresh migrated MariaDB database, dropped afterwards."""
    with mariadb_database("hostdev_capacity") as url:
        engine = create_database_engine(url)
        yield engine
        engine.dispose()


def test_a_failed_start_gives_back_what_its_start_took(engine: Engine) -> None:
    """Starting holds the VM's CPUs and memory; the agent's refusal gives them back."""
    harness = Harness(engine)
    harness.register("g1", "h1", devices(2))
    harness.api(api.CreateOfferingRequest(name="big", cpus=6, memory_mb=3000,
                                          pci_devices="10GE"))
    assert isinstance(harness.api(api.DeployVmRequest(name="vm1", offering="big")),
                      api.JobAccepted)
    assert len(harness.commands(StartCommand)) == 1
    assert _used(engine) == {"h1": (6, 3000)}  # Starting holds them
    assert harness.answer(ok=False, details="no such emulator") == 1
    assert _used(engine) == {"h1": (0, 0)}
    assert isinstance(harness.api(api.StartVmRequest(vm="vm1")), api.JobAccepted)
    assert harness.answer() == 1
    assert _used(engine) == {"h1": (6, 3000)}  # Running


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[tuple[BrokerCloud, Engine]]:
    """Management and agents sim-a and sim-b on MariaDB; an engine on the same database."""
    with mariadb_database("hostdev_capacity") as url, broker_cloud(url, tmp_path) as created:
        for name in ("sim-a", "sim-b"):
            created.add_host(name)
        created.request(api.CreateOfferingRequest(name="mig", cpus=2, memory_mb=1024,
                                                  pci_devices="10GE",
                                                  migration_policy="detach-attach"))
        created.request(api.CreateOfferingRequest(name="big", cpus=4, memory_mb=4096))
        engine = create_database_engine(url)
        yield created, engine
        engine.dispose()


def _finish(cloud: BrokerCloud, answer: object) -> None:
    assert isinstance(answer, api.JobAccepted), answer
    job = cloud.wait_job(answer.job_id)
    assert job.state == "succeeded", job.details


@pytest.mark.rabbitmq
@pytest.mark.libvirt
def test_used_capacity_follows_deploy_stop_start_migrate_and_destroy(
        cloud: tuple[BrokerCloud, Engine]) -> None:
    """Each operation moves exactly its VM's CPUs and memory, and only once it holds them."""
    broker, engine = cloud
    broker.deploy("m1", "mig", on="sim-a")
    broker.deploy("b1", "big", on="sim-b")
    assert _used(engine) == {"sim-a": (2, 1024), "sim-b": (4, 4096)}
    _finish(broker, broker.request(api.MigrateVmRequest(vm="m1", destination="sim-b")))
    assert broker.vm("m1").host_name == "sim-b"
    assert _used(engine) == {"sim-a": (0, 0), "sim-b": (6, 5120)}
    _finish(broker, broker.request(api.StopVmRequest(vm="b1")))
    assert _used(engine) == {"sim-a": (0, 0), "sim-b": (2, 1024)}
    _finish(broker, broker.request(api.StartVmRequest(vm="b1")))
    assert _used(engine) == {"sim-a": (4, 4096), "sim-b": (2, 1024)}  # first fit: sim-a
    _finish(broker, broker.request(api.DestroyVmRequest(vm="m1")))
    _finish(broker, broker.request(api.DestroyVmRequest(vm="b1")))
    assert _used(engine) == {"sim-a": (0, 0), "sim-b": (0, 0)}
