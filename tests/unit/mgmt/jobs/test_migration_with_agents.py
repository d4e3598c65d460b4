"""Live migration with PCI devices: management and real agents on simulated hosts, one process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from hostdev.agent.config import parse_config
from hostdev.agent.daemon import Agent
from hostdev.agent.startup_checks import check_host
from hostdev.messages import api
from hostdev.messages.bus.in_process import FakeClock, InProcessBroker, InProcessBus
from hostdev.messages.errors import RemoteError
from hostdev.messages.pci_address import PciAddress as P
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.service import ManagementService
from tests.support.agent import SAMPLE_DEVICES, HostFactory, host_factory
from tests.support.migration_checks import check_invariants
from tests.support.waiting import wait_for

pytestmark = pytest.mark.libvirt



@pytest.fixture
def make_host(tmp_path: Path) -> Iterator[HostFactory]:
    """Opens simulated hosts and closes them after the test."""
    yield from host_factory(tmp_path)


class Cloud:
    """Management, two agents (2 x 10GE and a GPU each) and a client on one broker."""

    def __init__(self, engine: Engine, make_host: HostFactory, policy: str = "detach-attach",
                 **faults: Any) -> None:
        self.engine = engine
        self.broker = InProcessBroker(clock=FakeClock())
        self.service = ManagementService(MgmtConfig(), InProcessBus(broker=self.broker), engine,
                                         name="unit")
        self.service.start()
        self.agents: list[Agent] = []
        for name in ("sim-a", "sim-b"):
            host = make_host(name, domains=[], **faults.get(name, {}))
            config = parse_config(f"guid=guid-{name}\nname={name}\nping.interval=30s\n"
                                  f"libvirt.uri={host.uri}\n"
                                  f"pci.devices={SAMPLE_DEVICES}\n", f"{name}.properties")
            agent = Agent(config, host, InProcessBus(broker=self.broker),
                          check_host(config, host.pci_devices(), host.domains()))
            agent.start()
            self.agents.append(agent)
        self.client = InProcessBus(broker=self.broker)
        self.broker.drain()
        self.request(api.CreateOfferingRequest(name="net2", pci_devices="10GE,10GE",
                                               migration_policy=policy))  # type: ignore[arg-type]
        accepted = self.request(api.DeployVmRequest(name="vm1", offering="net2"))
        assert isinstance(accepted, api.JobAccepted), accepted
        assert self.job(accepted.job_id).state == "succeeded"

    def request(self, message: Any) -> Any:
        """Sends an API request and returns the answer."""
        return self.client.request(message)

    def job(self, job_id: int) -> api.JobRow:
        """Waits until a job finished (agents work on their own threads) and returns it."""
        def finished() -> api.JobRow | None:
            self.broker.drain()
            answer = self.request(api.GetJobRequest(job_id=job_id))
            assert isinstance(answer, api.JobList)
            job = answer.jobs[0]
            return job if job.state in ("succeeded", "failed") else None
        return wait_for(finished, timeout=20, what=f"job {job_id} to finish")

    def vm(self) -> api.VmRow:
        """Returns vm1 as the API lists it."""
        answer = self.request(api.ListVmsRequest())
        assert isinstance(answer, api.VmList)
        return answer.vms[0]

    def check(self) -> None:
        """Asserts the invariants against both simulated hosts."""
        check_invariants(self.engine, {a.guid: a.hypervisor.domains() for a in self.agents})


def _migrate(cloud: Cloud, **extra: Any) -> api.JobRow:
    accepted = cloud.request(api.MigrateVmRequest(vm="vm1", **extra))
    assert isinstance(accepted, api.JobAccepted), accepted
    return cloud.job(accepted.job_id)


def test_migration_moves_the_vm_and_its_devices(engine: Engine, make_host: HostFactory) -> None:
    """Success: the VM runs on sim-b with sim-b's devices attached; sim-a's are free."""
    cloud = Cloud(engine, make_host)
    assert cloud.vm().host_name == "sim-a"
    job = _migrate(cloud)
    assert job.state == "succeeded", job.details
    vm = cloud.vm()
    assert (vm.state, vm.host_name) == ("Running", "sim-b")
    domain = cloud.agents[1].hypervisor.domain(vm.uuid)
    assert domain is not None and set(domain.hostdevs) == {P("28:00.1"), P("28:00.2")}
    assert cloud.agents[0].hypervisor.domain(vm.uuid) is None
    cloud.check()


def test_dry_run_shows_the_mapping_and_changes_nothing(engine: Engine,
                                                       make_host: HostFactory) -> None:
    """A dry run names the destination and pairs each source device; nothing moves."""
    cloud = Cloud(engine, make_host)
    plan = cloud.request(api.MigrateVmRequest(vm="vm1", dry_run=True))
    assert isinstance(plan, api.MigrationPlan)
    assert plan.destination_guid == "guid-sim-b"
    assert [(m.source, m.destination) for m in plan.devices] == [
        (P("28:00.1"), P("28:00.1")), (P("28:00.2"), P("28:00.2"))]
    assert (cloud.vm().state, cloud.vm().host_name) == ("Running", "sim-a")
    devices = cloud.request(api.ListPciDevicesRequest(host="sim-b"))
    # The GPU's audio function is not in pci.devices: its agent withholds the GPU.
    assert {(d.name, d.state) for d in devices.devices} == {("10GE", "free"),
                                                            ("GPU", "unavailable")}


def test_forbid_policy_refuses_naming_devices(engine: Engine, make_host: HostFactory) -> None:
    """Policy forbid: refused with the devices and the policy named; nothing changes."""
    cloud = Cloud(engine, make_host, policy="forbid")
    with pytest.raises(RemoteError, match="forbidden") as refused:
        cloud.request(api.MigrateVmRequest(vm="vm1"))
    assert "0000:28:00.1 (10GE)" in str(refused.value) and "'forbid'" in str(refused.value)
    assert cloud.vm().state == "Running"
    cloud.check()


def test_refused_detach_rolls_back(engine: Engine, make_host: HostFactory) -> None:
    """The guest refuses the second device: job fails at detach, VM stays on sim-a whole."""
    cloud = Cloud(engine, make_host, **{"sim-a": {"refuse_detach": ["28:00.2"]}})
    cloud.agents[0].commands.timeouts = type(cloud.agents[0].commands.timeouts)(detach_s=0.05)
    job = _migrate(cloud)
    assert (job.state, job.step) == ("failed", "detach"), job.details
    assert "0000:28:00.2" in job.details and "freed" in job.details
    assert (cloud.vm().state, cloud.vm().host_name) == ("Running", "sim-a")
    domain = cloud.agents[0].hypervisor.domain(cloud.vm().uuid)
    assert domain is not None and set(domain.hostdevs) == {P("28:00.1"), P("28:00.2")}
    cloud.check()


def test_failed_libvirt_migration_rolls_back(engine: Engine, make_host: HostFactory) -> None:
    """libvirt fails the migration: reservations freed, devices re-attached on sim-a."""
    cloud = Cloud(engine, make_host, **{"sim-a": {"fail_migration": "port 49152 refused"}})
    job = _migrate(cloud)
    assert (job.state, job.step) == ("failed", "migrate"), job.details
    assert "port 49152 refused" in job.details
    assert (cloud.vm().state, cloud.vm().host_name) == ("Running", "sim-a")
    cloud.check()
