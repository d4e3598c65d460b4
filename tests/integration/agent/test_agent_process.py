"""The real hostdev-agent process on RabbitMQ with a simulated host, seen through pika."""

from __future__ import annotations

import pytest

from tests.integration.agent.conftest import AgentRunner
from tests.support.agent import VM_OLD_UUID
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.libvirt, pytest.mark.rabbitmq]

VM = "55555555-aaaa-bbbb-cccc-000000000001"
NIC1, NIC2 = "0000:28:00.1", "0000:28:00.2"


def start_command(*devices: str) -> dict[str, object]:
    return {"type": "StartCommand", "v": 1, "vm": {
        "uuid": VM, "name": "vm-it", "cpus": 1, "memory_mb": 256,
        "pci_devices": list(devices)}}


def test_the_startup_message_carries_the_node_xml_inventory(run_agent: AgentRunner) -> None:
    """StartupRoutingCommand lists the configured devices with the node XML's ids and groups."""
    _daemon, mgmt = run_agent()
    startup = wait_for(mgmt.find("StartupRoutingCommand"), timeout=30, what="start-up")
    assert startup["guid"] == mgmt.guid and startup["name"] == "it-host"
    assert startup["migration_uri"].startswith("simulated:///")
    assert (startup["cpus"], startup["memory_mb"], startup["hypervisor"]) == (16, 65536, "test")
    assert [(d["address"], d["name"], d["vendor_id"], d["product_id"], d["iommu_group"])
            for d in startup["pci_devices"]] == [
        (NIC1, "10GE", "0x8086", "0x1572", 27), (NIC2, "10GE", "0x8086", "0x1572", 27),
        ("0000:3b:00.0", "GPU", "0x10de", "0x2204", 40)]
    domains = {d["uuid"]: d for d in startup["domains"]}
    assert domains[VM_OLD_UUID]["state"] == "running"
    assert domains[VM_OLD_UUID]["hostdevs"] == ["0000:3b:00.0"]


def test_a_start_command_gives_a_running_domain_with_its_hostdevs(
        run_agent: AgentRunner) -> None:
    """StartCommand is answered ok with both devices; a later change of the domain is reported.

    The start's own lifecycle events would only repeat the answer (running,
    both devices): no ``VmStateReport`` says that. The forced stop after it
    changes the domain, and its report is sent.
    """
    _daemon, mgmt = run_agent()
    wait_for(mgmt.find("StartupRoutingCommand"), timeout=30, what="start-up")
    command_id = mgmt.send(start_command(NIC1, NIC2))
    answer = wait_for(mgmt.find("StartAnswer", correlation_id=command_id), timeout=20,
                      what="StartAnswer")
    assert answer["result"] == "ok", answer
    assert answer["hostdevs"] == [NIC1, NIC2]
    stop_id = mgmt.send({"type": "StopCommand", "v": 1, "vm_uuid": VM, "force": True})
    stopped = wait_for(mgmt.find("StopAnswer", correlation_id=stop_id), timeout=20,
                       what="StopAnswer")
    assert (stopped["result"], stopped["state"]) == ("ok", "stopped"), stopped
    report = wait_for(mgmt.find("VmStateReport", vm_uuid=VM, state="stopped"), timeout=20,
                      what="the VmStateReport of the stop")
    assert report["hostdevs"] == [NIC1, NIC2]  # shut off, still defined with both
    assert report["seq"] > answer["seq"]
    assert mgmt.find("VmStateReport", vm_uuid=VM, state="running")() is None


def test_a_refused_detach_cancels_the_migration_and_keeps_every_device(
        run_agent: AgentRunner) -> None:
    """The answer names the refusing device; the domain still holds both devices after."""
    _daemon, mgmt = run_agent(ping="0.5s", refuse_detach=[NIC2])
    wait_for(mgmt.find("StartupRoutingCommand"), timeout=30, what="start-up")
    started = mgmt.send(start_command(NIC1, NIC2))
    wait_for(mgmt.find("StartAnswer", correlation_id=started), timeout=20, what="StartAnswer")
    migrate_id = mgmt.send({
        "type": "MigrateCommand", "v": 1, "vm_uuid": VM, "destination_guid": "elsewhere",
        "destination_uri": "simulated:///nowhere.json", "detach_timeout_s": 0.3})
    answer = wait_for(mgmt.find("MigrateAnswer", correlation_id=migrate_id), timeout=20,
                      what="MigrateAnswer")
    assert answer["result"] == "error" and answer["failed_step"] == "detach"
    assert answer["refused_device"] == NIC2
    assert (answer["detached"], answer["reattached"]) == ([NIC1], [NIC1])
    assert NIC2 in answer["details"]
    pings_before = mgmt.count("PingRoutingCommand")

    def later_ping() -> dict[str, object] | None:
        pings = [body for body, _ in mgmt.seen if body["type"] == "PingRoutingCommand"]
        return pings[-1] if mgmt.count("PingRoutingCommand") > pings_before else None

    ping = wait_for(later_ping, timeout=10, what="a ping after the answer")
    domain = {d["uuid"]: d for d in ping["domains"]}[VM]  # type: ignore[union-attr]
    assert domain["state"] == "running"
    assert sorted(domain["hostdevs"]) == [NIC1, NIC2]


def test_the_agent_reconnects_and_announces_again(run_agent: AgentRunner,
                                                  vhost: object) -> None:
    """After rabbitmqctl close_all_connections (this vhost) a second start-up arrives."""
    daemon, mgmt = run_agent()
    wait_for(mgmt.find("StartupRoutingCommand"), timeout=30, what="start-up")
    vhost.close_connections("hostdev agent reconnect test")  # type: ignore[attr-defined]
    mgmt.reconnect()
    wait_for(lambda: mgmt.count("StartupRoutingCommand") >= 2, timeout=60,
             what="a second StartupRoutingCommand")
    assert daemon.running
