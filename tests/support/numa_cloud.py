"""NUMA policies end to end in one process: management and agents on simulated hosts.

``NumaCloudContract`` runs twice: on SQLite (``tests/unit/mgmt/test_numa_with_agents.py``)
and on MariaDB (``tests/integration/mgmt/test_numa_mariadb.py``); each module
provides ``engine`` (a fresh migrated database per test) and ``make_host``.
sim-a has one GPU and one 10GE on each of its NUMA nodes 0 and 1; sim-b has
both its GPUs on node 1 and a 10GE on each node. Every device is in an IOMMU
group of its own, so only the NUMA rules decide.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest
from sqlalchemy import Engine

from hostdev.agent.config import parse_config
from hostdev.agent.daemon import Agent
from hostdev.agent.simulated import SimulatedHost
from hostdev.agent.startup_checks import check_host
from hostdev.messages import api
from hostdev.messages.bus.in_process import FakeClock, InProcessBroker, InProcessBus
from hostdev.messages.commands import StartCommand
from hostdev.messages.errors import RemoteError
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import PciDeviceInfo
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.service import ManagementService
from tests.support.agent import HostFactory
from tests.support.mgmt_harness import Harness
from tests.support.migration_checks import check_invariants
from tests.support.waiting import wait_for

#: (address, name, NUMA node) per host.
LAYOUTS = {
    "sim-a": (("3b:00.0", "GPU", 0), ("d8:00.0", "GPU", 1),
              ("28:00.0", "10GE", 0), ("86:00.0", "10GE", 1)),
    "sim-b": (("d8:00.0", "GPU", 1), ("d9:00.0", "GPU", 1),
              ("28:00.0", "10GE", 0), ("86:00.0", "10GE", 1)),
}


class NumaCloud:
    """Management, the agents of sim-a and sim-b, and an API client, on one broker."""

    def __init__(self, engine: Engine, make_host: HostFactory) -> None:
        self.engine = engine
        self.broker = InProcessBroker(clock=FakeClock())
        self.service = ManagementService(MgmtConfig(), InProcessBus(broker=self.broker), engine,
                                         name="unit")
        self.service.start()
        self.agents: dict[str, Agent] = {}
        for name, layout in LAYOUTS.items():
            devices = [{"address": a, "numa_node": node, "iommu_group": 100 + i}
                       for i, (a, _, node) in enumerate(layout)]
            host = make_host(name, devices=devices, domains=[])
            pci = ",".join(f"{a}|{n}" for a, n, _ in layout)
            config = parse_config(f"guid=guid-{name}\nname={name}\nping.interval=30s\n"
                                  f"libvirt.uri={host.uri}\npci.devices={pci}\n",
                                  f"{name}.properties")
            agent = Agent(config, host, InProcessBus(broker=self.broker),
                          check_host(config, host.pci_devices(), host.domains()))
            agent.start()
            self.agents[name] = agent
        self.client = InProcessBus(broker=self.broker)
        self.broker.drain()

    def request(self, message: Any) -> Any:
        """Sends an API request and returns the answer (a refusal raises RemoteError)."""
        return self.client.request(message)

    def offering(self, name: str, pci: str, numa: str) -> None:
        """Creates an offering that migrates with detach-attach."""
        self.request(api.CreateOfferingRequest(name=name, pci_devices=pci, numa_policy=numa,
                                               migration_policy="detach-attach"))

    def wait_job(self, accepted: Any) -> api.JobRow:
        """Waits until the accepted job finished (agents work on their own threads)."""
        assert isinstance(accepted, api.JobAccepted), accepted

        def finished() -> api.JobRow | None:
            self.broker.drain()
            job = self.request(api.GetJobRequest(job_id=accepted.job_id)).jobs[0]
            return job if job.state in ("succeeded", "failed") else None
        return wait_for(finished, timeout=20, what=f"job {accepted.job_id} to finish")

    def deploy(self, vm: str, offering: str) -> api.VmRow:
        """Deploys a VM, waits until it runs and returns it."""
        job = self.wait_job(self.request(api.DeployVmRequest(name=vm, offering=offering)))
        assert job.state == "succeeded", job.details
        return self.vm(vm)

    def vm(self, name: str) -> api.VmRow:
        """Returns a VM as the API lists it."""
        return next(v for v in self.request(api.ListVmsRequest()).vms if v.name == name)

    def nodes(self, vm: api.VmRow) -> list[int | None]:
        """Returns the NUMA node of each device the VM holds, by address."""
        listed = self.request(api.ListPciDevicesRequest(host=vm.host_name)).devices
        by_address = {d.address: d.numa_node for d in listed}
        return [by_address[a] for a in sorted(vm.pci_devices)]

    def nodesets(self, vm: api.VmRow) -> list[str | None]:
        """Returns the nodesets of the numatune of the VM's domain on its host."""
        assert vm.host_name is not None
        host = self.agents[vm.host_name].hypervisor
        assert isinstance(host, SimulatedHost)
        root = ET.fromstring(host.domain_xml(vm.uuid))
        return [m.get("nodeset") for m in root.findall("./numatune/memory")]

    def explain(self, offering: str) -> dict[str, str]:
        """Returns each host's verdict reason for an offering."""
        answer = self.request(api.ExplainPlacementRequest(offering=offering))
        return {v.host_name: v.reason for v in answer.verdicts}

    def check(self) -> None:
        """Asserts the allocation invariants against both simulated hosts."""
        check_invariants(self.engine, {a.guid: a.hypervisor.domains()
                                       for a in self.agents.values()})


class NumaCloudContract:
    """Deploys and migrations under NUMA policies ``required``, ``preferred`` and ``none``."""

    def test_required_puts_devices_on_one_node_and_binds_the_memory_there(
            self, engine: Engine, make_host: HostFactory) -> None:
        """2 GPUs required: sim-a is refused by its nodes; on sim-b both on node 1, bound there."""
        cloud = NumaCloud(engine, make_host)
        cloud.offering("gpu2", "GPU:2", "required")
        assert cloud.explain("gpu2") == {
            "sim-a": "no NUMA node has 2xGPU free: node 0 has 1, node 1 has 1", "sim-b": "fits"}
        vm = cloud.deploy("vm1", "gpu2")
        assert (vm.host_name, vm.numa_node, cloud.nodes(vm)) == ("sim-b", 1, [1, 1])
        assert cloud.nodesets(vm) == ["1"]
        with pytest.raises(RemoteError) as refused:
            cloud.request(api.DeployVmRequest(name="vm2", offering="gpu2"))
        assert ("no host has 2 x GPU free on one NUMA node: sim-a has no NUMA node with 2xGPU "
                "free (node 0 has 1, node 1 has 1), sim-b has 0") in str(refused.value)
        cloud.check()

    def test_preferred_uses_one_node_when_it_can_and_spreads_when_it_cannot(
            self, engine: Engine, make_host: HostFactory) -> None:
        """Preferred never refuses sim-a: 2 GPUs spread there; a GPU and a 10GE share a node."""
        cloud = NumaCloud(engine, make_host)
        cloud.offering("gpu2", "GPU:2", "preferred")
        cloud.offering("pair", "GPU,10GE", "preferred")
        assert cloud.explain("gpu2")["sim-a"] == "fits"
        spread = cloud.deploy("spread", "gpu2")
        assert (spread.host_name, spread.numa_node, cloud.nodes(spread)) == ("sim-a", None, [0, 1])
        together = cloud.deploy("together", "pair")
        assert (together.host_name, together.numa_node) == ("sim-b", 1)
        assert cloud.nodes(together) == [1, 1]
        assert cloud.nodesets(spread) == cloud.nodesets(together) == []  # preferred binds nothing
        cloud.check()

    def test_no_policy_takes_devices_anywhere_and_records_no_node(
            self, engine: Engine, make_host: HostFactory) -> None:
        """Policy none (the default): sim-a's two GPUs across nodes; no node, no binding."""
        cloud = NumaCloud(engine, make_host)
        cloud.request(api.CreateOfferingRequest(name="gpu2", pci_devices="GPU:2"))
        vm = cloud.deploy("vm1", "gpu2")
        assert (vm.host_name, vm.numa_node, cloud.nodes(vm), cloud.nodesets(vm)) == (
            "sim-a", None, [0, 1], [])

    def test_migration_reserves_on_one_node_and_rebinds_the_memory(
            self, engine: Engine, make_host: HostFactory) -> None:
        """A GPU+10GE VM moves from sim-a node 0 to sim-b node 1: devices, node, binding follow."""
        cloud = NumaCloud(engine, make_host)
        cloud.offering("pair", "GPU,10GE", "required")
        vm = cloud.deploy("vm1", "pair")
        assert (vm.host_name, vm.numa_node, cloud.nodes(vm), cloud.nodesets(vm)) == (
            "sim-a", 0, [0, 0], ["0"])
        plan = cloud.request(api.MigrateVmRequest(vm="vm1", dry_run=True))
        assert sorted(str(m.destination) for m in plan.devices) == [
            "0000:86:00.0", "0000:d8:00.0"]  # sim-b's node 1, where the move reserves
        job = cloud.wait_job(cloud.request(api.MigrateVmRequest(vm="vm1")))
        assert job.state == "succeeded", job.details
        moved = cloud.vm("vm1")
        assert (moved.host_name, moved.numa_node, cloud.nodes(moved)) == ("sim-b", 1, [1, 1])
        assert cloud.nodesets(moved) == ["1"]
        cloud.check()

    def test_migration_to_a_host_without_one_node_that_fits_is_refused(
            self, engine: Engine, make_host: HostFactory) -> None:
        """Moving a 2-GPU required VM to sim-a is refused naming sim-a's nodes; nothing moves."""
        cloud = NumaCloud(engine, make_host)
        cloud.offering("gpu2", "GPU:2", "required")
        cloud.deploy("vm1", "gpu2")
        with pytest.raises(RemoteError) as refused:
            cloud.request(api.MigrateVmRequest(vm="vm1", destination="sim-a"))
        assert ("cannot migrate VM vm1 to sim-a: no NUMA node has 2xGPU free: node 0 has 1, "
                "node 1 has 1") in str(refused.value)
        with pytest.raises(RemoteError) as nowhere:
            cloud.request(api.MigrateVmRequest(vm="vm1"))
        assert "sim-a has no NUMA node with 2xGPU free" in str(nowhere.value)
        vm = cloud.vm("vm1")
        assert (vm.state, vm.host_name, vm.numa_node) == ("Running", "sim-b", 1)
        cloud.check()

    def test_a_failed_start_ends_the_job_with_the_numa_refusal_of_the_other_host(
            self, engine: Engine) -> None:
        """sim-b's start fails; sim-a cannot take 2 GPUs on one node: the job says so."""
        h = Harness(engine)
        for name, layout in LAYOUTS.items():
            h.register(f"guid-{name}", name, [
                PciDeviceInfo(address=PciAddress(a), name=n, numa_node=node)
                for a, n, node in layout])
        h.api(api.CreateOfferingRequest(name="gpu2", pci_devices="GPU:2", numa_policy="required"))
        accepted = h.api(api.DeployVmRequest(name="vm1", offering="gpu2"))
        assert isinstance(accepted, api.JobAccepted), accepted
        [start] = [p.message for p in h.commands(StartCommand)]
        assert isinstance(start, StartCommand) and start.vm.numa_node == 1
        h.answer(ok=False, details="no such emulator")
        job = h.api(api.GetJobRequest(job_id=accepted.job_id))
        assert isinstance(job, api.JobList)
        assert (job.jobs[0].state, job.jobs[0].details) == ("failed", (
            "start failed on guid-sim-b: no such emulator; then no host has 2 x GPU free on "
            "one NUMA node: sim-a has no NUMA node with 2xGPU free (node 0 has 1, node 1 has "
            "1), sim-b is avoided"))
