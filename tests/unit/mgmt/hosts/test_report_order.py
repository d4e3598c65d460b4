"""Reports are applied in the order the agent took them: a late ping changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from hostdev.agent.config import parse_config
from hostdev.agent.daemon import Agent
from hostdev.agent.hypervisor import Hypervisor
from hostdev.agent.startup_checks import check_host
from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.bus.in_process import FakeClock, InProcessBroker, InProcessBus
from hostdev.messages.commands import PingRoutingCommand
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.hosts.report_order import STALE_REPORTS
from hostdev.mgmt.persistence.models import Host, VmInstance, utcnow
from hostdev.mgmt.service import ManagementService
from tests.support.agent import SAMPLE_DEVICES, HostFactory, host_factory

pytestmark = pytest.mark.libvirt


@pytest.fixture
def make_host(tmp_path: Path) -> Iterator[HostFactory]:
    """Opens simulated hosts and closes them after the test."""
    yield from host_factory(tmp_path)


class Cloud:
    """Management and one real agent (2 x 10GE and a GPU) on the in-process bus."""

    def __init__(self, engine: Engine, make_host: HostFactory) -> None:
        self.engine = engine
        self.clock = FakeClock()
        self.broker = InProcessBroker(clock=self.clock)
        self.service = ManagementService(MgmtConfig(), InProcessBus(broker=self.broker), engine,
                                         name="unit")
        self.service.start()
        self.host = make_host("sim-a", domains=[])
        self.agent = self.new_agent(self.host)
        self.client = InProcessBus(broker=self.broker)
        self.broker.drain()

    def new_agent(self, host: Hypervisor) -> Agent:
        """Starts an agent process on ``host`` (a second call: the agent restarted)."""
        config = parse_config(f"guid=guid-a\nname=sim-a\nping.interval=30s\n"
                              f"libvirt.uri={self.host.uri}\npci.devices={SAMPLE_DEVICES}\n",
                              "sim-a.properties")
        agent = Agent(config, host, InProcessBus(broker=self.broker),
                      check_host(config, host.pci_devices(), host.domains()))
        agent.start()
        return agent

    def deploy(self, name: str) -> str:
        """Deploys a VM with 2 x 10GE on the host; returns its uuid once Running."""
        self.client.request(api.CreateOfferingRequest(name=f"o-{name}", pci_devices="10GE:2"))
        accepted = self.client.request(api.DeployVmRequest(name=name, offering=f"o-{name}"))
        assert isinstance(accepted, api.JobAccepted) and accepted.vm_uuid
        self.broker.drain()
        assert self.vm(accepted.vm_uuid) == "Running"
        return accepted.vm_uuid

    def vm(self, uuid: str) -> str:
        """Returns the VM's state as management has it."""
        with Session(self.engine) as session:
            vm = session.scalar(select(VmInstance).where(VmInstance.uuid == uuid))
            assert vm is not None
            return vm.state

    def held_devices(self) -> int:
        """Returns how many 10GE devices a VM holds."""
        devices = self.client.request(api.ListPciDevicesRequest())
        assert isinstance(devices, api.PciDeviceList)
        return len([d for d in devices.devices if d.name == "10GE" and d.vm_uuid])

    def past_the_grace(self, seconds: float) -> None:
        """Lets ``seconds`` pass for the broker, and for the time-based grace of old agents."""
        self.clock.advance(seconds)
        with Session(self.engine) as session, session.begin():
            session.execute(update(VmInstance).values(
                updated_at=utcnow() - timedelta(seconds=seconds)))


def take_ping(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> PingRoutingCommand:
    """Returns the ping the agent takes now, without publishing it."""
    taken: list[Message] = []
    with monkeypatch.context() as patch:
        patch.setattr(agent.bus, "send_to_mgmt",
                      lambda _guid, message, **_: taken.append(message) or "")
        agent.ping()
    ping = taken[0]
    assert isinstance(ping, PingRoutingCommand)
    return ping


def deliver(cloud: Cloud, agent: Agent, message: Message) -> None:
    """Publishes a message the agent took earlier and lets management handle it."""
    agent.bus.send_to_mgmt(agent.guid, message)
    cloud.broker.drain()


def stale(kind: str) -> float:
    """Returns the count of reports (whole, or for one VM) not applied so far."""
    return sum(STALE_REPORTS.labels(kind, scope)._value.get() for scope in ("host", "vm"))


def test_a_ping_taken_before_a_start_answer_and_delivered_30_s_later_changes_nothing(
        engine: Engine, make_host: HostFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ping lists no domain; the VM it predates stays Running with its devices."""
    cloud = Cloud(engine, make_host)
    early = take_ping(cloud.agent, monkeypatch)
    assert early.domains == () and early.boot_id == cloud.agent.sequence.boot_id
    uuid = cloud.deploy("vm1")
    before = stale("PingRoutingCommand")
    cloud.past_the_grace(30.0)
    deliver(cloud, cloud.agent, early)
    assert cloud.vm(uuid) == "Running" and cloud.held_devices() == 2
    assert stale("PingRoutingCommand") == before + 1
    cloud.agent.ping()  # a ping taken now still says the VM runs
    cloud.broker.drain()
    assert cloud.vm(uuid) == "Running" and cloud.held_devices() == 2


def test_a_stale_ping_of_the_same_boot_is_not_applied(
        engine: Engine, make_host: HostFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ping overtaken by a newer one of the same boot does not bring a stopped VM back."""
    cloud = Cloud(engine, make_host)
    uuid = cloud.deploy("vm1")
    running = take_ping(cloud.agent, monkeypatch)  # lists vm1 running
    cloud.host.destroy(uuid)  # behind management's back
    cloud.past_the_grace(60.0)
    cloud.agent.ping()
    cloud.broker.drain()
    assert cloud.vm(uuid) == "Stopped" and cloud.held_devices() == 0
    before = stale("PingRoutingCommand")
    deliver(cloud, cloud.agent, running)
    assert cloud.vm(uuid) == "Stopped" and cloud.held_devices() == 0
    assert stale("PingRoutingCommand") == before + 1


def test_a_ping_of_a_new_boot_is_applied_and_the_old_boot_is_retired(
        engine: Engine, make_host: HostFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted agent numbers from 1 again: its reports apply, the old boot's do not."""
    cloud = Cloud(engine, make_host)
    uuid = cloud.deploy("vm1")
    old_boot = cloud.agent.sequence.boot_id
    running = take_ping(cloud.agent, monkeypatch)  # the old boot, vm1 running
    cloud.host.destroy(uuid)
    cloud.past_the_grace(60.0)
    restarted = cloud.new_agent(cloud.host)
    new_ping = take_ping(restarted, monkeypatch)
    assert new_ping.boot_id != old_boot and new_ping.seq < running.seq
    deliver(cloud, restarted, new_ping)
    assert cloud.vm(uuid) == "Stopped" and cloud.held_devices() == 0
    deliver(cloud, cloud.agent, running)  # late, from the boot before the restart
    assert cloud.vm(uuid) == "Stopped" and cloud.held_devices() == 0
    with Session(engine) as session:
        host = session.scalar(select(Host).where(Host.guid == "guid-a"))
        assert host is not None
        assert (host.report_boot_id, host.retired_boot_id) == (new_ping.boot_id, old_boot)
