"""ManagementService with real agents (simulated hosts) on the in-process bus twin."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from hostdev.agent.config import parse_config
from hostdev.agent.daemon import Agent
from hostdev.agent.startup_checks import check_host
from hostdev.messages import api
from hostdev.messages.bus.in_process import FakeClock, InProcessBroker, InProcessBus
from hostdev.messages.commands import StopAnswer
from hostdev.messages.errors import RemoteError
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.persistence.models import Job, VmInstance, utcnow
from hostdev.mgmt.service import ManagementService
from tests.support.agent import SAMPLE_DEVICES, HostFactory, host_factory, sample_spec

pytestmark = pytest.mark.libvirt



@pytest.fixture
def make_host(tmp_path: Path) -> Iterator[HostFactory]:
    """Opens simulated hosts and closes them after the test."""
    yield from host_factory(tmp_path)


class Cloud:
    """Management, two agents (2 x 10GE and a GPU each) and a client on one broker."""

    def __init__(self, engine: Engine, make_host: HostFactory) -> None:
        self.broker = InProcessBroker(clock=FakeClock())
        self.service = ManagementService(MgmtConfig(), InProcessBus(broker=self.broker), engine,
                                         name="unit")
        self.service.start()
        self.agents = []
        for name in ("sim-a", "sim-b"):
            host = make_host(name)
            config = parse_config(f"guid=guid-{name}\nname={name}\nping.interval=30s\n"
                                  f"libvirt.uri={host.uri}\n"
                                  f"pci.devices={SAMPLE_DEVICES}\n", f"{name}.properties")
            agent = Agent(config, host, InProcessBus(broker=self.broker),
                          check_host(config, host.pci_devices(), host.domains()))
            agent.start()
            self.agents.append(agent)
        self.client = InProcessBus(broker=self.broker)
        self.broker.drain()

    def job(self, job_id: int) -> str:
        """Returns the state of a job after everything pending was handled."""
        self.broker.drain()
        answer = self.client.request(api.GetJobRequest(job_id=job_id))
        assert isinstance(answer, api.JobList)
        return answer.jobs[0].state


def test_deploy_stop_redeploy_with_real_agents(engine: Engine, make_host: HostFactory) -> None:
    """Real agents start VMs with the claimed devices; a stop frees them for the next VM."""
    cloud = Cloud(engine, make_host)
    hosts = cloud.client.request(api.ListHostsRequest())
    assert isinstance(hosts, api.HostList)
    assert [(h.name, h.status, h.total_devices) for h in hosts.hosts] == [
        ("sim-a", "Up", 3), ("sim-b", "Up", 3)]
    cloud.client.request(api.CreateOfferingRequest(name="net2", pci_devices="10GE,10GE"))
    first = cloud.client.request(api.DeployVmRequest(name="vm1", offering="net2"))
    second = cloud.client.request(api.DeployVmRequest(name="vm2", offering="net2"))
    assert isinstance(first, api.JobAccepted) and isinstance(second, api.JobAccepted)
    assert cloud.job(first.job_id) == "succeeded" and cloud.job(second.job_id) == "succeeded"
    domain = cloud.agents[0].hypervisor.domain(first.vm_uuid or "")
    assert domain is not None and domain.state == "running"
    assert sorted(domain.hostdevs) == ["0000:28:00.1", "0000:28:00.2"]
    with pytest.raises(RemoteError, match="no host has 2 x 10GE free: sim-a has 0, "
                                          "sim-b has 0"):
        cloud.client.request(api.DeployVmRequest(name="vm3", offering="net2"))
    stop = cloud.client.request(api.StopVmRequest(vm="vm1"))
    assert isinstance(stop, api.JobAccepted) and cloud.job(stop.job_id) == "succeeded"
    third = cloud.client.request(api.DeployVmRequest(name="vm3", offering="net2"))
    assert isinstance(third, api.JobAccepted) and cloud.job(third.job_id) == "succeeded"
    assert cloud.broker.dead_letters() == []


def test_agent_power_report_releases_devices(engine: Engine, make_host: HostFactory) -> None:
    """A VM destroyed behind management's back is Stopped by the next ping, devices free."""
    cloud = Cloud(engine, make_host)
    cloud.client.request(api.CreateOfferingRequest(name="net2", pci_devices="10GE:2"))
    accepted = cloud.client.request(api.DeployVmRequest(name="vm1", offering="net2"))
    assert isinstance(accepted, api.JobAccepted) and cloud.job(accepted.job_id) == "succeeded"
    with Session(engine) as session, session.begin():  # older than the drift grace
        session.execute(update(VmInstance).values(updated_at=utcnow() - timedelta(minutes=1)))
    cloud.agents[0].hypervisor.destroy(accepted.vm_uuid or "")
    cloud.agents[0].ping()
    cloud.broker.drain()
    devices = cloud.client.request(api.ListPciDevicesRequest(free_only=True))
    assert isinstance(devices, api.PciDeviceList)
    assert len([d for d in devices.devices if d.name == "10GE"]) == 4


def test_an_answer_from_another_host_is_dead_lettered(engine: Engine,
                                                      make_host: HostFactory) -> None:
    """sim-b answering the command sent to sim-a, or a guessed id: dead letters, VM unchanged."""
    cloud = Cloud(engine, make_host)
    cloud.client.request(api.CreateOfferingRequest(name="net2", pci_devices="10GE:2"))
    accepted = cloud.client.request(api.DeployVmRequest(name="vm1", offering="net2"))
    assert isinstance(accepted, api.JobAccepted) and cloud.job(accepted.job_id) == "succeeded"
    with Session(engine) as session:
        observed = session.scalar(select(Job.command_id).where(Job.id == accepted.job_id))
    forger = InProcessBus(broker=cloud.broker)
    forger.connect()
    forged = StopAnswer(vm_uuid=accepted.vm_uuid or "", state="stopped")
    forger.send_to_mgmt("guid-sim-b", forged, correlation_id=observed)
    forger.send_to_mgmt("guid-sim-b", forged, correlation_id="outbox-1")
    cloud.broker.drain()
    reasons = [d.reason for d in cloud.broker.dead_letters()]
    assert len(reasons) == 2, reasons
    assert "from host guid-sim-b" in reasons[0] and "went to host guid-sim-a" in reasons[0]
    assert "no command management sent" in reasons[1]
    vms = cloud.client.request(api.ListVmsRequest())
    assert isinstance(vms, api.VmList) and [v.state for v in vms.vms] == ["Running"]


def test_agents_report_device_facts_that_management_stores_and_lists(
        engine: Engine, make_host: HostFactory) -> None:
    """NUMA node, group members, PF/VF, names, class and driver go from spec to the API."""
    devices = sample_spec()["devices"]
    facts = {"28:00.1": {"numa_node": 0, "driver": "i40e"},
             "28:00.2": {"numa_node": 0, "driver": "vfio-pci", "physical_function": "28:00.1"},
             "3b:00.0": {"numa_node": 1, "driver": "vfio-pci"}}
    for device in devices:
        device.update(facts.get(device["address"], {}))
    cloud = Cloud(engine, lambda name, **extra: make_host(name, devices=devices, **extra))
    listed = cloud.client.request(api.ListPciDevicesRequest(host="sim-a"))
    assert isinstance(listed, api.PciDeviceList)
    rows = {str(d.address): d for d in listed.devices}
    pf, vf, gpu = rows["0000:28:00.1"], rows["0000:28:00.2"], rows["0000:3b:00.0"]
    assert (pf.numa_node, pf.driver, pf.virtual_functions, pf.physical_function) == (
        0, "i40e", ("0000:28:00.2",), None)
    assert (vf.physical_function, vf.virtual_functions, vf.driver) == (
        "0000:28:00.1", (), "vfio-pci")
    assert pf.iommu_members == ("0000:00:03.1", "0000:28:00.1", "0000:28:00.2")
    assert (gpu.numa_node, gpu.iommu_group, gpu.iommu_members) == (
        1, 40, ("0000:3b:00.0", "0000:3b:00.1"))
    assert (gpu.vendor, gpu.product, gpu.class_code, gpu.vendor_id) == (
        "NVIDIA", "GA102", 0x030000, "0x10de")
