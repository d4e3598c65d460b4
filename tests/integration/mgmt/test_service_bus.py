"""ManagementService on the real RabbitMQ and MariaDB, with a scripted agent on its own bus."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from hostdev.messages import api
from hostdev.messages.bus import Bus, BusConfig
from hostdev.messages.commands import (
    StartAnswer,
    StartCommand,
    StartupAnswer,
    StartupRoutingCommand,
    StopAnswer,
    StopCommand,
)
from hostdev.messages.errors import RemoteError
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.persistence.database import create_database_engine
from hostdev.mgmt.service import ManagementService
from tests.support.databases import mariadb_database
from tests.support.mgmt_harness import devices
from tests.support.rabbitmq import amqp_vhost
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mariadb]


class ScriptedAgent:
    """An agent that registers with N 10GE devices and says yes to start and stop."""

    def __init__(self, url: str, guid: str, count: int) -> None:
        self.bus = Bus(BusConfig(url=url, queue_type="classic", app_id="test-agent"))
        self.guid = guid
        self.count = count
        self.accepted = threading.Event()

    def _started(self, command: StartCommand, _: Any) -> StartAnswer:
        return StartAnswer(vm_uuid=command.vm.uuid, hostdevs=command.vm.pci_devices)

    def _stopped(self, command: StopCommand, _: Any) -> StopAnswer:
        return StopAnswer(vm_uuid=command.vm_uuid, state="stopped")

    def _answer(self, answer: StartupAnswer, _: Any) -> None:
        self.accepted.set()

    def run(self) -> None:
        """Connects, announces and answers until stopped (on the calling thread)."""
        self.bus.connect()
        queue = self.bus.declare_agent_queue(self.guid)
        self.bus.consume(queue, {StartCommand: self._started, StopCommand: self._stopped,
                                 StartupAnswer: self._answer})
        self.bus.send_to_mgmt(self.guid, StartupRoutingCommand(
            guid=self.guid, name=f"host-{self.guid}", cpus=16, memory_mb=32768,
            pci_devices=devices(self.count)))
        self.bus.run()


@pytest.fixture
def stack() -> Iterator[Bus]:
    """Runs a service and two scripted agents; yields a client bus."""
    with amqp_vhost("mgmt") as vhost, mariadb_database("hostdev_mgmt_bus") as db_url:
        engine = create_database_engine(db_url)
        bus_config = BusConfig(url=vhost.url, queue_type="classic", app_id="hostdev-mgmt")
        service = ManagementService(MgmtConfig(db_url=db_url, amqp_url=vhost.url),
                                    Bus(bus_config), engine, name="it")
        agents = [ScriptedAgent(vhost.url, "ga", 2), ScriptedAgent(vhost.url, "gb", 2)]
        service_thread = threading.Thread(target=service.run, daemon=True)
        service_thread.start()
        client = Bus(BusConfig(url=vhost.url, queue_type="classic", app_id="test-client"))
        wait_for(lambda: _hosts(client) is not None, timeout=20, what="management answers")
        threads = [threading.Thread(target=agent.run, daemon=True) for agent in agents]
        for thread in threads:
            thread.start()
        for agent in agents:
            assert agent.accepted.wait(20), f"agent {agent.guid} got no StartupAnswer"
        try:
            yield client
        finally:
            client.close()
            for agent in agents:
                agent.bus.stop()
            service.stop()
            for thread in [*threads, service_thread]:
                thread.join(timeout=10)
            for agent in agents:
                agent.bus.close()
            service.close()
            engine.dispose()


def _hosts(client: Bus) -> api.HostList | None:
    answer = client.request(api.ListHostsRequest(), timeout=2)
    return answer if isinstance(answer, api.HostList) else None


def _job_done(client: Bus, job_id: int) -> str | None:
    answer = client.request(api.GetJobRequest(job_id=job_id), timeout=5)
    assert isinstance(answer, api.JobList)
    state = answer.jobs[0].state
    return state if state in ("succeeded", "failed") else None


def test_deploy_stop_redeploy_over_the_broker(stack: Bus) -> None:
    """Deploys fill both hosts, the next is refused, a stop frees a host for the next deploy."""
    client = stack
    hosts = _hosts(client)
    assert hosts is not None and [h.free_devices for h in hosts.hosts] == [2, 2]
    client.request(api.CreateOfferingRequest(name="net2", pci_devices="10GE,10GE"))
    jobs = []
    for name in ("vm1", "vm2"):
        accepted = client.request(api.DeployVmRequest(name=name, offering="net2"))
        assert isinstance(accepted, api.JobAccepted)
        jobs.append(accepted.job_id)
    for job_id in jobs:
        assert wait_for(lambda job_id=job_id: _job_done(client, job_id), timeout=20,
                        what=f"job {job_id}") == "succeeded"
    with pytest.raises(RemoteError, match=r"no host has 2 x 10GE free: host-g. has 0, "
                                          r"host-g. has 0$"):
        client.request(api.DeployVmRequest(name="vm3", offering="net2"))
    stop = client.request(api.StopVmRequest(vm="vm1"))
    assert isinstance(stop, api.JobAccepted)
    assert wait_for(lambda: _job_done(client, stop.job_id), timeout=20) == "succeeded"
    again = client.request(api.DeployVmRequest(name="vm3", offering="net2"))
    assert isinstance(again, api.JobAccepted)
    assert wait_for(lambda: _job_done(client, again.job_id), timeout=20) == "succeeded"
    vms = client.request(api.ListVmsRequest())
    assert isinstance(vms, api.VmList)
    assert sorted((v.name, v.state) for v in vms.vms) == [
        ("vm1", "Stopped"), ("vm2", "Running"), ("vm3", "Running")]
