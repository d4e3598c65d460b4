"""hostdev end to end: hostdev-mgmt and three hostdev-agent processes on RabbitMQ and MariaDB.

Everything is driven from outside, as an operator or a client would: the
``hostdev`` CLI as a subprocess, API requests on a Bus client, plain SQL on
the database, the simulated hosts' state files, and signals to processes.
One deployment (two management daemons, hosts e2e-a and e2e-b with four
10GE devices, e2e-c with five) serves the module; each test first brings it
to the state it needs (``fill``) and asserts only what it did itself.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostdev.messages import api
from hostdev.messages.bus import Bus, BusConfig
from hostdev.messages.errors import RemoteError
from tests.e2e.conftest import StackFactory
from tests.support.e2e_stack import Stack
from tests.support.processes import Daemon
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mariadb, pytest.mark.libvirt]

OFFERING = "net2"
HOSTS = {"e2e-a": {"10GE": 4}, "e2e-b": {"10GE": 4}, "e2e-c": {"10GE": 5}}
#: Two devices per VM: a and b take two VMs each, c two and keeps one device free.
CAPACITY = 6
_names = iter(range(1000))


@pytest.fixture(scope="module")
def stack(make_e2e_stack: StackFactory) -> Iterator[Stack]:
    """Two management daemons, three simulated hosts, offering net2 = 10GE,10GE."""
    created = make_e2e_stack(mgmt=2, hosts=HOSTS)
    done = created.cli("offering", "create", OFFERING, "--pci", "10GE,10GE")
    assert done.returncode == 0, done.stderr
    yield created


# -- helpers --------------------------------------------------------------------------


def deploy(stack: Stack) -> tuple[str, api.JobAccepted | RemoteError]:
    """Sends one deploy request; returns the VM name and the answer (or the refusal)."""
    name = f"vm{next(_names)}"
    try:
        answer = stack.request(api.DeployVmRequest(name=name, offering=OFFERING))
    except RemoteError as exc:
        return name, exc
    assert isinstance(answer, api.JobAccepted), answer
    return name, answer


def fill(stack: Stack) -> list[str]:
    """Deploys until management refuses; returns the names deployed now (all succeeded)."""
    deployed = []
    while True:
        name, answer = deploy(stack)
        if isinstance(answer, RemoteError):
            assert "no host has 2 x 10GE free" in answer.reason, answer.reason
            return deployed
        job = stack.wait_job(answer.job_id)
        assert job.state == "succeeded", job
        deployed.append(name)


def vms(stack: Stack) -> dict[str, Any]:
    """Lists live VMs through the CLI, by name."""
    return {vm["name"]: vm for vm in stack.cli_json("vm", "list")}


def held(stack: Stack) -> dict[str, set[str]]:
    """Reads op_host_pci_devices: VM uuid -> the addresses it holds (host:address)."""
    rows = stack.sql(
        "SELECT h.name AS host, d.domain, d.bus, d.slot, d.function, d.state, v.uuid "
        "FROM op_host_pci_devices d JOIN hosts h ON h.id = d.host_id "
        "LEFT JOIN vm_instances v ON v.id = d.instance_id WHERE d.instance_id IS NOT NULL")
    found: dict[str, set[str]] = {}
    for row in rows:
        found.setdefault(row["uuid"], set()).add(
            f"{row['host']}:{row['domain']}:{row['bus']}:{row['slot']}.{row['function']}")
    return found


def check_consistency(stack: Stack) -> None:
    """Asserts the database and the simulated hosts agree about every device and VM.

    Each device row is unique per host and address and held by at most one VM;
    a held device is ``allocated``; every Running VM holds exactly two 10GE
    devices on its own host, and its domain runs there with exactly those
    hostdevs; no VM that is not Running holds anything or runs anywhere.
    """
    devices = stack.sql(
        "SELECT d.host_id, d.domain, d.bus, d.slot, d.function, d.state, d.instance_id, "
        "v.state AS vm_state, v.host_id AS vm_host FROM op_host_pci_devices d "
        "LEFT JOIN vm_instances v ON v.id = d.instance_id")
    keys = [(d["host_id"], d["domain"], d["bus"], d["slot"], d["function"]) for d in devices]
    assert len(keys) == len(set(keys)), "a device row appears twice"
    for device in devices:
        if device["instance_id"] is None:
            assert device["state"] in ("free", "disabled", "removed"), device
        else:
            assert device["state"] == "allocated", device
            assert device["vm_state"] == "Running", device
            assert device["vm_host"] == device["host_id"], device
    holdings = held(stack)
    running_domains = {uuid: (host.name, hostdevs)
                       for host in stack.hosts.values()
                       for uuid, (_, running, hostdevs) in host.domains().items() if running}
    live = stack.sql("SELECT uuid, name, state FROM vm_instances WHERE state <> 'Destroyed'")
    for vm in live:
        if vm["state"] == "Running":
            addresses = holdings.get(vm["uuid"], set())
            assert len(addresses) == 2, (vm, addresses)
            assert vm["uuid"] in running_domains, f"{vm['name']} runs on no simulated host"
            host, hostdevs = running_domains[vm["uuid"]]
            assert addresses == {f"{host}:{a}" for a in hostdevs}, (vm, addresses, hostdevs)
        else:
            assert vm["uuid"] not in holdings, vm
            assert vm["uuid"] not in running_domains, vm
    assert set(running_domains) <= {vm["uuid"] for vm in live if vm["state"] == "Running"}


def refusal(stderr: str) -> set[str]:
    """Splits the CLI's refusal into its per-host parts (hosts are listed by id)."""
    prefix = "error: no host has 2 x 10GE free: "
    assert stderr.startswith(prefix), stderr
    return set(stderr.strip().removeprefix(prefix).split(", "))


def host_of(stack: Stack, name: str) -> str:
    return str(vms(stack)[name]["host_name"])


# -- the tests ---------------------------------------------------------------------------


def test_deploys_fill_the_hosts_then_the_next_is_refused_with_the_reason(stack: Stack) -> None:
    """Deploys succeed until the 10GE devices run out; the next says why, per host."""
    fill(stack)
    running = [vm for vm in vms(stack).values() if vm["state"] == "Running"]
    assert len(running) == CAPACITY
    assert sorted(vm["host_name"] for vm in running) == sorted(
        ["e2e-a"] * 2 + ["e2e-b"] * 2 + ["e2e-c"] * 2)
    refused = stack.cli("vm", "deploy", "one-too-many", "--offering", OFFERING)
    assert refused.returncode == 1
    assert refusal(refused.stderr) == {"e2e-a has 0", "e2e-b has 0", "e2e-c has 1"}
    assert "one-too-many" not in vms(stack)


def test_each_device_is_held_by_one_vm_and_the_domains_hold_exactly_those(
        stack: Stack) -> None:
    """op_host_pci_devices, read with SQL, matches the VMs and the hosts' libvirt domains."""
    fill(stack)
    holdings = held(stack)
    everything = [a for addresses in holdings.values() for a in addresses]
    assert len(everything) == len(set(everything)) == 2 * CAPACITY
    check_consistency(stack)


def test_stopping_a_vm_frees_its_devices_for_the_next_deploy(stack: Stack) -> None:
    """hostdev vm stop releases both rows; the next deploy gets exactly those devices."""
    fill(stack)
    victim = next(name for name, vm in vms(stack).items()
                  if vm["state"] == "Running" and vm["host_name"] == "e2e-b")
    victim_uuid = vms(stack)[victim]["uuid"]
    freed = held(stack)[victim_uuid]
    guid = stack.hosts["e2e-b"].guid
    tap = stack.tap_events()
    stopped = stack.cli("vm", "stop", victim, "--wait")
    assert stopped.returncode == 0, stopped.stderr
    assert vms(stack)[victim]["state"] == "Stopped"
    assert victim_uuid not in held(stack)
    rows = stack.sql("SELECT state FROM op_host_pci_devices d JOIN hosts h ON h.id = d.host_id "
                     "WHERE h.name = 'e2e-b' AND d.state = 'free'")
    assert len(rows) == 2
    assert not stack.hosts["e2e-b"].domains()[victim_uuid][1], "the domain still runs"
    deployed = stack.cli("vm", "deploy", "after-stop", "--offering", OFFERING, "--wait")
    assert deployed.returncode == 0, deployed.stderr
    new_uuid = vms(stack)["after-stop"]["uuid"]
    assert held(stack)[new_uuid] == freed
    check_consistency(stack)

    def moved(kind: str, vm_uuid: str) -> set[str] | None:
        found = {f"e2e-b:{body['address']}" for key, body in tap.events()
                 if key == f"pci.{guid}.{kind}" and body["vm_uuid"] == vm_uuid}
        return found if len(found) == 2 else None
    assert wait_for(lambda: moved("Released", victim_uuid), timeout=10) == freed
    assert wait_for(lambda: moved("Allocated", new_uuid), timeout=10) == freed
    assert f"vm.{victim_uuid}.Stopped" in tap.routing_keys()


def test_a_killed_agent_goes_down_and_comes_back_with_its_allocations(stack: Stack) -> None:
    """SIGKILL: the host is Down and not offered; restarted, it registers and keeps its VMs."""
    fill(stack)
    on_c = sorted(name for name, vm in vms(stack).items()
                  if vm["state"] == "Running" and vm["host_name"] == "e2e-c")
    assert len(on_c) == 2
    stopped = stack.cli("vm", "stop", on_c[0], "--wait")
    assert stopped.returncode == 0, stopped.stderr
    keeper = vms(stack)[on_c[1]]["uuid"]
    before = held(stack)
    host = stack.hosts["e2e-c"]
    status_events = f"host.{host.guid}."
    tap = stack.tap_events()
    host.kill()
    wait_for(lambda: stack.hosts_by_name()["e2e-c"].status == "Down", timeout=30,
             what="e2e-c to be Down")
    wait_for(lambda: f"{status_events}Down" in tap.routing_keys(), timeout=10,
             what="the Down event")
    assert [k for k in tap.routing_keys() if k.startswith(status_events)] == [
        f"{status_events}Disconnected", f"{status_events}Down"]
    refused = stack.cli("vm", "deploy", "while-down", "--offering", OFFERING)
    assert refused.returncode == 1
    assert refusal(refused.stderr) == {"e2e-a has 0", "e2e-b has 0", "e2e-c is Down"}
    explained = {v["host_name"]: v for v in stack.cli_json("explain", OFFERING)["verdicts"]}
    assert not explained["e2e-c"]["accepted"] and "Down" in explained["e2e-c"]["reason"]
    assert held(stack) == before
    host.restart().wait_log("startup_accepted", timeout=60)
    stack.wait_hosts_up("e2e-c")
    wait_for(lambda: f"{status_events}Up" in tap.routing_keys(), timeout=10, what="the Up event")
    assert held(stack) == before, "re-registration changed the allocations"
    assert vms(stack)[on_c[1]]["state"] == "Running"
    assert host.domains()[keeper][1], "the VM's domain did not survive the agent restart"
    deployed = stack.cli("vm", "deploy", "after-restart", "--offering", OFFERING, "--wait")
    assert deployed.returncode == 0, deployed.stderr
    assert host_of(stack, "after-restart") == "e2e-c"
    check_consistency(stack)


def _signal_agents(stack: Stack, signum: int) -> None:
    for host in stack.hosts.values():
        assert host.daemon.process is not None
        os.killpg(host.daemon.process.pid, signum)


def _placed_by(stack: Stack, vm_uuid: str) -> Daemon:
    def find() -> Daemon | None:
        for daemon in stack.mgmts:
            if any(r.get("event") == "vm_placed" and r.get("vm") == vm_uuid
                   for r in daemon.records()):
                return daemon
        return None
    return wait_for(find, timeout=20, what=f"a daemon to place {vm_uuid}")


def test_a_daemon_killed_mid_deploy_leaves_the_job_to_the_other(stack: Stack) -> None:
    """SIGKILL of the daemon that placed a VM: the survivor finishes the job, nothing leaks."""
    fill(stack)
    for name in sorted(n for n, vm in vms(stack).items() if vm["state"] == "Running")[:2]:
        assert stack.cli("vm", "stop", name, "--wait").returncode == 0
    _signal_agents(stack, signal.SIGSTOP)  # the StartCommand waits, unanswered
    try:
        name, accepted = deploy(stack)
        assert isinstance(accepted, api.JobAccepted), accepted
        placer = _placed_by(stack, str(accepted.vm_uuid))
        placer.kill()
    finally:
        _signal_agents(stack, signal.SIGCONT)
    job = stack.wait_job(accepted.job_id)
    assert job.state == "succeeded", job
    assert vms(stack)[name]["state"] == "Running"
    check_consistency(stack)
    stack.mgmts.remove(placer)
    stack.start_mgmt()


def _placements(daemon: Daemon) -> int:
    return sum(1 for r in daemon.records() if r.get("event") == "vm_placed")


def test_a_daemon_killed_during_a_burst_of_deploys_finishes_or_rolls_back_each(
        stack: Stack) -> None:
    """SIGKILL amid four concurrent deploys: each is answered and ends; claims match VMs."""
    fill(stack)
    for name in sorted(n for n, vm in vms(stack).items() if vm["state"] == "Running")[:4]:
        assert stack.cli("vm", "stop", name, "--wait").returncode == 0
    victim = stack.mgmts[0]
    placed_before = _placements(victim)
    answers: list[api.JobAccepted | RemoteError | BaseException] = []

    def client() -> None:
        bus = Bus(BusConfig(url=stack.vhost.url, queue_type=stack.queue_type,
                            app_id="hostdev-e2e"))
        try:
            answers.append(bus.request(api.DeployVmRequest(
                name=f"burst{next(_names)}", offering=OFFERING), timeout=30))
        except BaseException as exc:  # reported by the assertion below
            answers.append(exc)
        finally:
            bus.close()

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: _placements(victim) > placed_before or len(answers) == 4, timeout=30,
             what="the first daemon to place a VM of the burst")
    victim.kill()
    for thread in threads:
        thread.join(60)
    accepted = [a for a in answers if isinstance(a, api.JobAccepted)]
    assert len(accepted) == 4, answers
    for answer in accepted:
        assert stack.wait_job(answer.job_id).state in ("succeeded", "failed")
    wait_for(lambda: not stack.sql("SELECT id FROM vm_instances WHERE state IN "
                                   "('Starting', 'Stopping')"), timeout=30,
             what="no VM in a transient state")
    check_consistency(stack)
    stack.mgmts.remove(victim)
    stack.start_mgmt()


def test_a_deploy_to_a_dead_agent_times_out_and_rolls_back(make_e2e_stack: StackFactory) -> None:
    """No answer: the job fails, devices are freed; the restarted agent leaves no domain."""
    lone = make_e2e_stack(mgmt=1, hosts={"e2e-t": {"10GE": 2}}, prefix="e2e-timeout",
                          mgmt_properties={"job.start.timeout": "3s"})
    assert lone.cli("offering", "create", OFFERING, "--pci", "10GE:2").returncode == 0
    host = lone.hosts["e2e-t"]
    host.kill()  # still Up for two seconds: the deploy is placed on it
    name, accepted = deploy(lone)
    assert isinstance(accepted, api.JobAccepted), accepted
    job = lone.wait_job(accepted.job_id, timeout=30)
    assert job.state == "failed" and "timed out" in job.details, job
    assert vms(lone)[name]["state"] == "Stopped"
    assert held(lone) == {}
    host.restart().wait_log("startup_accepted", timeout=60)
    # The StartCommand and then the rollback's forced StopCommand waited in its queue.
    wait_for(lambda: str(accepted.vm_uuid) not in host.domains(), timeout=30,
             what="the rolled-back VM's domain to be undefined")
    check_consistency(lone)
    again = lone.cli("vm", "deploy", "after-timeout", "--offering", OFFERING, "--wait")
    assert again.returncode == 0, again.stderr
    check_consistency(lone)
    lone.close()


# -- systemd notify ---------------------------------------------------------------------


class NotifySocket:
    """A unix datagram socket standing in for systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="hd-")  # short: sun_path has 108 bytes
        self.path = str(Path(self.folder) / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.lines: list[str] = []

    def wait_ready(self, daemon: Daemon) -> str:
        """Waits for the READY=1 datagram; fails at once, with its log, if ``daemon`` exits."""
        found = wait_for(lambda: self.ready() or (None if daemon.running else "exited"),
                         timeout=60, what=f"READY=1 from {daemon.name}")
        assert found != "exited", f"{daemon.name} exited before READY=1:\n{daemon.tail()}"
        return found

    def ready(self) -> str | None:
        """Reads what arrived; returns the datagram carrying READY=1, if one did."""
        while True:
            try:
                data = self.sock.recv(4096).decode()
            except BlockingIOError:
                break
            self.lines.append(data)
        return next((d for d in self.lines if "READY=1" in d.splitlines()), None)

    def close(self) -> None:
        self.sock.close()
        Path(self.path).unlink(missing_ok=True)
        os.rmdir(self.folder)


def test_both_daemons_send_ready_once_connected(make_e2e_stack: StackFactory) -> None:
    """READY=1 reaches $NOTIFY_SOCKET from hostdev-mgmt run and hostdev-agent, after connecting."""
    fresh = make_e2e_stack(mgmt=0, prefix="e2e-notify")
    notify = NotifySocket()
    try:
        mgmt = fresh.start_mgmt(env={"NOTIFY_SOCKET": notify.path}, wait=False)
        datagram = notify.wait_ready(mgmt)
        assert any(r.get("event") == "mgmt_started" for r in mgmt.records())
        assert fresh.hosts_by_name() == {}, "ready but not answering the API"
        assert "STATUS=" in datagram
        notify.lines.clear()
        agent = fresh.start_host("e2e-n", {"10GE": 1}, env={"NOTIFY_SOCKET": notify.path})
        datagram = notify.wait_ready(agent.daemon)
        assert any(r.get("event") == "agent_announced" for r in agent.daemon.records())
        assert agent.guid in datagram
        fresh.wait_hosts_up("e2e-n")
    finally:
        fresh.close()
        notify.close()
