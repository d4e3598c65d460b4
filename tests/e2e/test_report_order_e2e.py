"""Reports are applied in the agent's order, and repeats are answered, on the real services.

One stack serves the module: ``hostdev-mgmt run`` (metrics on a free port)
and two simulated hosts whose agents connect as their own broker users:
``order``, which pings once a minute (no ping of its own lands among the
ones a test publishes), and ``repeat``, which pings twice a second.

- A ping taken before a ``StartAnswer`` and delivered after it (a broker
  backlog, a redelivery) is published as ``order``'s own broker user with
  the agent's real boot id and a number below the answer's: it changes
  nothing. A ping numbered above the answer is applied (the control).
- ``repeat``'s agent is restarted (SIGTERM, then the same configuration and
  state directory), and management's ``StartCommand`` of a VM since stopped
  is published again with its original message id, as an outbox
  re-publication would: the agent answers from the memory it persisted and
  does not start the domain.
"""

from __future__ import annotations

import re
import socket
import urllib.request
import uuid as uuid_module
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pika
import pytest

from hostdev.messages import api
from hostdev.messages.base import Message, PowerState
from hostdev.messages.bus.contract import COMMANDS_EXCHANGE
from hostdev.messages.codec import decode, encode
from hostdev.messages.commands import PingRoutingCommand, StartCommand
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DomainInfo
from tests.e2e.conftest import StackFactory
from tests.support.e2e_stack import SimHost, Stack
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mariadb, pytest.mark.libvirt, pytest.mark.slow]

#: ``order`` pings once a minute: hosts must stay Up without its pings meanwhile.
PATIENT_HOSTS = {"host.disconnected.timeout": "5m", "host.down.timeout": "10m"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class World:
    """The stack, its two hosts and management's metrics port."""

    stack: Stack
    order: SimHost
    repeat: SimHost
    metrics_port: int

    def stale_reports(self) -> float:
        """Returns management's count of pings not applied, wholly or for one VM."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return sum(float(value) for value in re.findall(
            r'^hostdev_stale_reports_total\{scope="(?:host|vm)",type="PingRoutingCommand"\} '
            r"(\S+)$", text, re.MULTILINE))

    def vm(self, name: str) -> dict[str, Any]:
        """Returns a VM's row."""
        return self.stack.sql("SELECT * FROM vm_instances WHERE name = %s", name)[0]

    def devices_of(self, name: str) -> list[dict[str, Any]]:
        """Returns the device rows allocated to a VM."""
        return self.stack.sql(
            "SELECT d.* FROM op_host_pci_devices d JOIN vm_instances v ON v.id = d.instance_id "
            "WHERE v.name = %s ORDER BY d.id", name)

    def host_row(self, host: SimHost) -> dict[str, Any]:
        """Returns a host's row."""
        return self.stack.sql("SELECT * FROM hosts WHERE guid = %s", host.guid)[0]

    def deploy(self, name: str, on: SimHost) -> str:
        """Deploys ``name`` (net2) on host ``on``; waits until it runs; returns its uuid."""
        others = tuple(h.guid for h in (self.order, self.repeat) if h is not on)
        answer = self.stack.request(api.DeployVmRequest(name=name, offering="net2",
                                                        avoid=others))
        assert isinstance(answer, api.JobAccepted), answer
        job = self.stack.wait_job(answer.job_id)
        assert job.state == "succeeded", job
        return answer.vm_uuid


@pytest.fixture(scope="module")
def world(make_e2e_stack: StackFactory) -> Iterator[World]:
    """Management (with metrics) and the hosts ``order`` and ``repeat``, own broker users."""
    port = _free_port()
    stack = make_e2e_stack(mgmt=1, prefix="order",
                           mgmt_properties={**PATIENT_HOSTS, "metrics.port": str(port)})
    order = stack.start_host("order", {"10GE": 4}, ping="60s", own_user=True)
    repeat = stack.start_host("repeat", {"10GE": 4}, own_user=True)
    stack.wait_hosts_up()
    done = stack.cli("offering", "create", "net2", "--pci", "10GE,10GE")
    assert done.returncode == 0, done.stderr
    yield World(stack, order, repeat, port)


class Publisher:
    """Publishes on ``hostdev.commands`` with pika as one broker user (confirmed)."""

    def __init__(self, url: str, user: str) -> None:
        self.user = user
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    @classmethod
    def agent(cls, host: SimHost) -> Publisher:
        """Connects as ``host``'s own broker user, with the URL from its agent.properties."""
        config = host.config_path.read_text(encoding="utf-8")
        url = re.search(r"^amqp\.url=(\S+)$", config, re.MULTILINE)
        assert url, config
        return cls(url[1], f"agent-{host.guid}")

    def send(self, routing_key: str, message: Message, message_id: str | None = None) -> None:
        """Publishes ``message`` as hostdev does (a random id unless ``message_id``)."""
        props = pika.BasicProperties(
            user_id=self.user, content_type="application/json", type=type(message).__name__,
            message_id=message_id or uuid_module.uuid4().hex, delivery_mode=2)
        self.channel.basic_publish(COMMANDS_EXCHANGE, routing_key, encode(message), props)

    def ping(self, guid: str, seq: int, boot_id: str, *domains: DomainInfo) -> None:
        """Publishes the ping of host ``guid`` numbered ``seq`` listing ``domains``."""
        self.send(f"mgmt.{guid}.PingRoutingCommand",
                  PingRoutingCommand(guid=guid, domains=domains, boot_id=boot_id, seq=seq))

    def close(self) -> None:
        """Closes the connection."""
        if self.connection.is_open:
            self.connection.close()


def _domain(uuid: str, name: str, state: PowerState, hostdevs: list[dict[str, Any]]
            ) -> DomainInfo:
    """The domain a ping lists for a VM holding the device rows ``hostdevs``."""
    return DomainInfo(uuid=uuid, name=name, state=state, hostdevs=tuple(
        PciAddress(f"{d['domain']}:{d['bus']}:{d['slot']}.{d['function']}") for d in hostdevs))


def test_a_ping_taken_before_a_start_answer_changes_nothing(world: World) -> None:
    """A ping numbered below a VM's StartAnswer leaves it Running; one above it is applied.

    The agent's own reports of the start (libvirt's lifecycle events) are
    numbered after the answer and arrive first, so the delayed ping is older
    than the host's last applied report and is not applied at all.
    """
    early_uuid = world.deploy("early", world.order)
    late_uuid = world.deploy("late", world.order)
    late = world.vm("late")
    assert late["state"] == "Running"
    boot_id, answer_seq = late["answer_boot_id"], late["answer_seq"]
    assert boot_id == world.host_row(world.order)["report_boot_id"]  # the agent's real boot
    early_devices, late_devices = world.devices_of("early"), world.devices_of("late")
    assert len(early_devices) == 2 and len(late_devices) == 2
    running_early = _domain(early_uuid, "early", "running", early_devices)
    before = {t: world.stack.sql(f"SELECT * FROM {t} ORDER BY id")
              for t in ("vm_instances", "op_host_pci_devices")}
    counted = world.stale_reports()
    agent = Publisher.agent(world.order)
    try:
        # Taken after early's start and before late's: numbered below late's answer.
        # Late not started yet: one lists no domain of it, the other has it stopped.
        agent.ping(world.order.guid, answer_seq - 1, boot_id, running_early)
        agent.ping(world.order.guid, answer_seq - 1, boot_id, running_early,
                   _domain(late_uuid, "late", "stopped", []))
        wait_for(lambda: world.stale_reports() >= counted + 2, timeout=20,
                 what="management to count the two stale pings")
        assert {t: world.stack.sql(f"SELECT * FROM {t} ORDER BY id") for t in before} == before
        assert world.vm("late")["state"] == "Running"
        assert world.devices_of("late") == late_devices

        # The control: numbered after everything applied, the same news is applied.
        newer = max(answer_seq, world.host_row(world.order)["report_seq"]) + 1
        agent.ping(world.order.guid, newer, boot_id, running_early,
                   _domain(late_uuid, "late", "stopped", []))
        wait_for(lambda: world.vm("late")["state"] == "Stopped", timeout=20,
                 what="the newer ping to stop late")
    finally:
        agent.close()
    assert world.devices_of("late") == []
    assert world.vm("early")["state"] == "Running"
    assert world.devices_of("early") == early_devices


def test_a_command_repeated_after_an_agent_restart_is_answered_not_run(world: World) -> None:
    """The StartCommand of a since-stopped VM, re-sent after a restart, starts nothing."""
    vm_uuid = world.deploy("again", world.repeat)
    stack = world.stack
    job = stack.request(api.StopVmRequest(vm="again"))
    assert isinstance(job, api.JobAccepted)
    assert stack.wait_job(job.job_id).state == "succeeded"
    assert world.repeat.domains()[vm_uuid][1] is False
    command_id = stack.sql(
        "SELECT j.command_id FROM jobs j JOIN vm_instances v ON v.id = j.vm_id "
        "WHERE v.name = 'again' AND j.kind = 'deploy'")[0]["command_id"]
    sent = stack.sql("SELECT routing_key, body FROM event_outbox WHERE message_id = %s",
                     command_id)[0]
    command = decode(sent["body"])
    assert isinstance(command, StartCommand) and command.vm.uuid == vm_uuid

    old_boot = world.host_row(world.repeat)["report_boot_id"]
    world.repeat.restart()  # SIGTERM, then the same agent.properties and state dir
    world.repeat.daemon.wait_log("startup_accepted", timeout=30)
    assert world.host_row(world.repeat)["report_boot_id"] not in (None, old_boot)

    # Management's outbox publishing the command again: same key, same id, as guest.
    management = Publisher(stack.vhost.url, "guest")
    try:
        management.send(sent["routing_key"], command, message_id=command_id)
    finally:
        management.close()
    world.repeat.daemon.wait_log("command_repeated", type="StartCommand")
    # Its first answer again: management finds the deploy job done and changes nothing.
    stack.mgmts[0].wait_log("answer_without_job", correlation_id=command_id)
    assert not [r for r in world.repeat.daemon.records() if r.get("event") == "command_answered"]
    assert world.repeat.domains()[vm_uuid][1] is False
    assert world.vm("again")["state"] == "Stopped"
    assert world.devices_of("again") == []
