"""Management and real agents on simulated hosts, each on its own bus to a real RabbitMQ.

``broker_cloud`` yields a ``BrokerCloud``: a ``ManagementService`` on a given
database (MariaDB or SQLite) and a fresh vhost, agents (``hostdev.agent``'s
``Agent``) on simulated hosts that migrate to each other in memory, each
running its bus loop on a thread, and a client bus for API requests. Each
device sits in an IOMMU group of its own, so a VM holds exactly the devices
its offering names. The CLI runs in process against the client bus (``cli``).
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostdev.agent.config import parse_config
from hostdev.agent.daemon import Agent
from hostdev.agent.simulated import SimulatedHost, SimulatedHosts
from hostdev.agent.startup_checks import check_host
from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.bus import Bus, BusConfig
from hostdev.messages.values import HostRow, VmRow
from hostdev.mgmt.cli import build_parser
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.persistence.database import create_database_engine
from hostdev.mgmt.service import ManagementService
from tests.support.agent import write_spec
from tests.support.databases import uncovered_hosts
from tests.support.rabbitmq import amqp_vhost
from tests.support.waiting import wait_for

#: The four 10GE functions of every host, each in an IOMMU group of its own.
ADDRESSES = ("28:00.0", "28:00.1", "28:00.2", "28:00.3")


@dataclass
class CloudAgent:
    """One agent: its simulated host and the thread running its bus loop."""

    name: str
    guid: str
    host: SimulatedHost
    agent: Agent
    thread: threading.Thread


@dataclass
class BrokerCloud:
    """A management service, agents and a client on one vhost."""

    url: str
    service: ManagementService
    client: Bus
    work: Path
    hosts: SimulatedHosts = field(default_factory=SimulatedHosts)
    agents: dict[str, CloudAgent] = field(default_factory=dict)

    def add_host(self, name: str, **properties: str) -> CloudAgent:
        """Starts an agent on a new simulated host with ``ADDRESSES`` as 10GE; waits until Up."""
        spec = {"name": name, "cpus": 16, "memory_mb": 65536,
                "devices": [{"address": a, "iommu_group": 100 + n}
                            for n, a in enumerate(ADDRESSES)]}
        host = SimulatedHost(write_spec(self.work, spec), hosts=self.hosts)
        host.open()
        text = (f"guid=guid-{name}\nname={name}\namqp.url={self.url}\namqp.queue.type=classic\n"
                f"libvirt.uri={host.uri}\nping.interval=300ms\n"
                f"pci.devices={','.join(f'{a}|10GE' for a in ADDRESSES)}\n"
                + "".join(f"{k}={v}\n" for k, v in properties.items()))
        config = parse_config(text, f"{name}.properties")
        bus = Bus(BusConfig(url=self.url, queue_type="classic", app_id=f"agent-{name}"))
        agent = Agent(config, host, bus, check_host(config, host.pci_devices(), host.domains()))
        thread = threading.Thread(target=agent.run, name=f"agent-{name}", daemon=True)
        thread.start()
        entry = CloudAgent(name, f"guid-{name}", host, agent, thread)
        self.agents[name] = entry
        wait_for(lambda: self.host(name).status == "Up", timeout=20, what=f"{name} Up")
        return entry

    def request(self, message: Message, timeout: float = 15.0) -> Message:
        """Sends an API request; returns the answer (RemoteError on a refusal)."""
        return self.client.request(message, timeout=timeout)

    def host(self, name: str) -> HostRow:
        """Returns one host as the API lists it."""
        answer = self.request(api.ListHostsRequest(host=name))
        assert isinstance(answer, api.HostList) and answer.hosts, answer
        return answer.hosts[0]

    def vm(self, name: str) -> VmRow:
        """Returns one VM as the API lists it."""
        answer = self.request(api.ListVmsRequest())
        assert isinstance(answer, api.VmList)
        (row,) = [vm for vm in answer.vms if vm.name == name]
        return row

    def devices(self, host: str) -> dict[str, Any]:
        """Returns a host's devices by address: (state, reason, vm uuid)."""
        answer = self.request(api.ListPciDevicesRequest(host=host))
        assert isinstance(answer, api.PciDeviceList)
        return {str(d.address): (d.state, d.reason, d.vm_uuid) for d in answer.devices}

    def wait_job(self, job_id: int, timeout: float = 30.0) -> api.JobRow:
        """Waits until a job finished; returns it."""
        def finished() -> api.JobRow | None:
            answer = self.request(api.GetJobRequest(job_id=job_id))
            assert isinstance(answer, api.JobList)
            job = answer.jobs[0]
            return job if job.state in ("succeeded", "failed") else None
        return wait_for(finished, timeout=timeout, what=f"job {job_id} to finish")

    def deploy(self, name: str, offering: str, on: str) -> str:
        """Deploys a VM on host ``on`` (the others avoided); returns its uuid."""
        avoid = tuple(n for n in self.agents if n != on)
        accepted = self.request(api.DeployVmRequest(name=name, offering=offering, avoid=avoid))
        assert isinstance(accepted, api.JobAccepted), accepted
        job = self.wait_job(accepted.job_id)
        assert job.state == "succeeded", job.details
        assert accepted.vm_uuid is not None
        return accepted.vm_uuid

    def cli(self, *argv: str) -> tuple[int, str]:
        """Runs ``hostdev ARGV`` in process on the client bus; returns status and stdout."""
        args = build_parser().parse_args(list(argv))
        out = io.StringIO()
        status: int = args.func(args, requester=lambda message, timeout: self.request(
            message, timeout), out=out)
        return status, out.getvalue()

    def close(self) -> None:
        """Stops the agents, then management; closes the client."""
        for entry in self.agents.values():
            entry.agent.stop()
        for entry in self.agents.values():
            entry.thread.join(timeout=10)
            entry.host.close()
        self.service.stop()
        self.client.close()


@contextmanager
def broker_cloud(db_url: str, work: Path, **config: Any) -> Iterator[BrokerCloud]:
    """Yields a cloud on ``db_url`` and a fresh vhost; stops everything after."""
    with amqp_vhost("cloud") as vhost:
        engine = create_database_engine(db_url)
        settings = {"host_sweep_interval_s": 0.2, "job_sweep_interval_s": 0.5,
                    "ping_interval_s": 0.3, **config}
        service = ManagementService(
            MgmtConfig(db_url=db_url, amqp_url=vhost.url, amqp_queue_type="classic",
                       **settings),
            Bus(BusConfig(url=vhost.url, queue_type="classic", app_id="hostdev-mgmt")),
            engine, name="cloud")
        thread = threading.Thread(target=service.run, name="mgmt", daemon=True)
        thread.start()
        client = Bus(BusConfig(url=vhost.url, queue_type="classic", app_id="test-client"))
        cloud = BrokerCloud(vhost.url, service, client, work)
        try:
            wait_for(lambda: _answers(cloud), timeout=20, what="management answers")
            yield cloud
            with engine.connect() as conn:  # whatever the test did, placement skips no host
                assert uncovered_hosts(conn) == []
        finally:
            cloud.close()
            thread.join(timeout=10)
            with contextlib.suppress(Exception):
                service.close()
            engine.dispose()


def _answers(cloud: BrokerCloud) -> bool:
    with contextlib.suppress(Exception):
        return isinstance(cloud.request(api.ListHostsRequest(), timeout=2), api.HostList)
    return False
