"""End to end on real libvirt: hostdev-mgmt and two hostdev-agent on the lab's daemons.

Driven by the ``hostdev`` CLI; after each step the rows of
``op_host_pci_devices`` are read from MariaDB and the domains from libvirt.
The guests are the lab's booted guest; the agents run with the lab option,
so the devices are emulated stand-ins and everything else is real.
"""

from __future__ import annotations

import json
import uuid as uuid_module
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from hostdev.agent.errors import HypervisorError
from hostdev.messages import api
from hostdev.messages.domain_template import render_domain
from hostdev.messages.values import VmSpec
from tests.support.e2e_stack import Stack, e2e_stack
from tests.support.migration_checks import violations
from tests.support.migration_e2e import database, vm_row
from tests.support.realvm import GUEST_MEMORY_MIB, Console, Lab, lab_template
from tests.support.realvm_stack import LabAgent, start_lab_agent
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.realvm, pytest.mark.rabbitmq, pytest.mark.mariadb]

DEVICES = {"0000:28:00.0", "0000:28:00.1"}  # both hosts' two 10GE


@dataclass
class Cloud:
    """The stack, its two lab agents, and where the guests write their consoles."""

    stack: Stack
    agents: dict[str, LabAgent]
    consoles: Path
    lab: Lab

    def rows(self) -> dict[str, dict[str, tuple[str, str | None, str | None]]]:
        """Device rows by host: address -> (state, holder VM name, reserved-for VM name)."""
        found: dict[str, dict[str, tuple[str, str | None, str | None]]] = {}
        for row in self.stack.sql(
                "SELECT h.name AS host, d.domain, d.bus, d.slot, d.function, d.state, "
                "held.name AS holder, res.name AS reserved FROM op_host_pci_devices d "
                "JOIN hosts h ON h.id = d.host_id "
                "LEFT JOIN vm_instances held ON held.id = d.instance_id "
                "LEFT JOIN vm_instances res ON res.id = d.reserved_for"):
            address = f"{row['domain']}:{row['bus']}:{row['slot']}.{row['function']}"
            found.setdefault(row["host"], {})[address] = (row["state"], row["holder"],
                                                          row["reserved"])
        return found

    def held_by(self, vm: str) -> dict[str, set[str]]:
        """The addresses each host's rows give to ``vm``."""
        return {host: {a for a, (_state, holder, _r) in rows.items() if holder == vm}
                for host, rows in self.rows().items()}

    def settle(self) -> None:
        """Waits until the migration invariants hold between MariaDB and both daemons."""
        with database(self.stack) as engine:
            def broken() -> list[str]:
                return violations(engine, {a.guid: a.domains() for a in self.agents.values()})
            try:
                wait_for(lambda: not broken(), timeout=20, what="the migration invariants")
            except AssertionError:
                raise AssertionError("invariants broken:\n" + "\n".join(broken())) from None

    def console(self, vm: str) -> Console:
        """The console of a VM (the path management chose, as ``vm show`` prints it)."""
        shown = self.cli_json("vm", "show", vm)
        return Console(Path(shown["console_path"]))

    def cli_json(self, *args: str, ok: bool = True) -> Any:
        """Runs ``hostdev ARGS --json``; with ``ok`` fails unless it exits 0."""
        done = self.stack.cli(*args, "--json")
        if ok:
            assert done.returncode == 0, f"hostdev {' '.join(args)}: {done.stderr}"
        return json.loads(done.stdout)


@pytest.fixture(scope="module")
def cloud(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """One hostdev-mgmt, agents a and b (two 10GE stand-ins each), two lab offerings."""
    work = tmp_path_factory.mktemp("realvm-e2e")
    consoles = work / "consoles"
    consoles.mkdir()
    with e2e_stack(work, prefix="realvm", mgmt_properties={
            "job.migrate.timeout": "60s", "job.start.timeout": "60s",
            "job.attach.timeout": "6s"}) as stack:
        stack.start_mgmt()
        agents: dict[str, LabAgent] = {}
        try:
            for name, daemon in (("a", lab.a), ("b", lab.b)):
                agents[name] = start_lab_agent(stack, name, daemon, {"10GE": 2},
                                               {"timeout.detach": "3s"})
            wait_for(lambda: all(r.status == "Up" for r in stack.hosts_by_name().values())
                     and len(stack.hosts_by_name()) == 2, timeout=60, what="hosts a, b Up")
            created = Cloud(stack=stack, agents=agents, consoles=consoles, lab=lab)
            for offering, refuse in (("lab", False), ("stubborn", True)):
                path = work / f"{offering}.xml"
                path.write_text(lab_template(lab.guest, consoles, refuse_unplug=refuse),
                                encoding="utf-8")
                created.cli_json("template", "create", offering, "--file", str(path))
                created.cli_json("offering", "create", offering, "--pci", "10GE:2", "--cpus",
                                 "1", "--memory", str(GUEST_MEMORY_MIB), "--migration-policy",
                                 "detach-attach", "--template", offering)
            yield created
        finally:
            for agent in agents.values():
                agent.daemon.stop()
                host = agent.host()
                for domain in host.domains():
                    try:
                        host.destroy(domain.uuid)
                        host.undefine(domain.uuid)
                    except HypervisorError:
                        continue
                host.close()


def _deploy(cloud: Cloud, vm: str, offering: str, on: str) -> Console:
    avoid = [arg for host in cloud.agents if host != on for arg in ("--avoid", host)]
    job = cloud.cli_json("vm", "deploy", vm, "--offering", offering, *avoid, "--wait")
    assert job["state"] == "succeeded", job
    console = cloud.console(vm)
    console.wait_tick_after(0, timeout=90)
    return console


def _migrate(cloud: Cloud, vm: str, to: str) -> dict[str, Any]:
    job: dict[str, Any] = cloud.cli_json("vm", "migrate", vm, "--to", to, "--wait", ok=False)
    return job


def _destroy(cloud: Cloud, vm: str) -> None:
    job = cloud.cli_json("vm", "destroy", vm, "--wait")
    assert job["state"] == "succeeded", job


def test_deploy_migrate_and_stop_a_booted_guest(cloud: Cloud) -> None:
    """Deploy on a, migrate to b (the guest keeps counting), stop: rows follow each step."""
    console = _deploy(cloud, "web", "lab", on="a")
    assert cloud.held_by("web") == {"a": DEVICES, "b": set()}
    assert cloud.agents["a"].hostdevs(vm_row(cloud.stack, "web").uuid) == DEVICES
    assert {"0000:00:10.0", "0000:00:11.0"} <= console.wait_tick_after(0).pci
    before = console.last()
    assert before is not None
    job = _migrate(cloud, "web", "b")
    assert job["state"] == "succeeded", job
    row = vm_row(cloud.stack, "web")
    assert (row.state, row.host_name) == ("Running", "b")
    assert cloud.held_by("web") == {"a": set(), "b": DEVICES}
    assert {state for state, _h, _r in cloud.rows()["a"].values()} == {"free"}
    assert cloud.agents["b"].hostdevs(row.uuid) == DEVICES
    console.wait_sees(0x11)
    numbers = [t.n for t in console.ticks()]
    assert numbers == sorted(numbers) and numbers[-1] > before.n, "the guest did not move live"
    cloud.settle()
    stopped = cloud.cli_json("vm", "stop", "web", "--force", "--wait")
    assert stopped["state"] == "succeeded", stopped
    assert cloud.held_by("web") == {"a": set(), "b": set()}
    assert [d.state for d in cloud.agents["b"].domains() if d.uuid == row.uuid] == ["stopped"]
    _destroy(cloud, "web")


def test_a_guest_refusing_the_detach_keeps_the_vm_and_rows_on_the_source(cloud: Cloud) -> None:
    """The guest keeps a device: the job fails at detach, VM, devices and rows stay on a."""
    console = _deploy(cloud, "stuck", "stubborn", on="a")
    uuid = vm_row(cloud.stack, "stuck").uuid
    rows_before = cloud.rows()["a"]
    job = _migrate(cloud, "stuck", "b")
    assert (job["state"], job["step"]) == ("failed", "detach"), job
    assert "did not release" in job["details"]
    row = vm_row(cloud.stack, "stuck")
    assert (row.state, row.host_name) == ("Running", "a")
    assert cloud.rows()["a"] == rows_before
    assert cloud.held_by("stuck")["b"] == set()
    assert cloud.agents["a"].hostdevs(uuid) == DEVICES
    assert {"0000:00:10.0", "0000:00:11.0"} <= console.wait_tick_after(console.last().n).pci
    cloud.settle()
    _destroy(cloud, "stuck")


def test_a_failing_libvirt_migration_reattaches_on_the_source(cloud: Cloud) -> None:
    """b's libvirt refuses the domain: the job fails at migrate, devices back in the guest on a."""
    console = _deploy(cloud, "grounded", "lab", on="a")
    uuid = vm_row(cloud.stack, "grounded").uuid
    b = cloud.agents["b"].host()
    squatter = VmSpec(uuid=str(uuid_module.uuid4()), name="grounded", cpus=1,
                      memory_mb=GUEST_MEMORY_MIB)
    try:  # a domain of the same name on b: libvirt there refuses the incoming one
        b.define(render_domain(lab_template(cloud.lab.guest, cloud.consoles), squatter))
        job = _migrate(cloud, "grounded", "b")
    finally:
        b.undefine(squatter.uuid)
        b.close()
    assert (job["state"], job["step"]) == ("failed", "migrate"), job
    assert "already exists" in job["details"]
    row = vm_row(cloud.stack, "grounded")
    assert (row.state, row.host_name) == ("Running", "a")
    assert cloud.held_by("grounded") == {"a": DEVICES, "b": set()}
    assert cloud.agents["a"].hostdevs(uuid) == DEVICES
    for slot in (0x10, 0x11):
        console.wait_sees(slot)
    _destroy(cloud, "grounded")


def test_the_source_agent_killed_mid_migration_is_finished_by_the_destination(
        cloud: Cloud) -> None:
    """a's agent dies while libvirt copies the guest: libvirt finishes, b's report ends the job."""
    console = _deploy(cloud, "runaway", "lab", on="a")
    uuid = vm_row(cloud.stack, "runaway").uuid
    a = cloud.agents["a"].host()
    try:
        domain = a.lookup(uuid)
        accepted = cloud.stack.request(api.MigrateVmRequest(vm="runaway", destination="b"))
        assert isinstance(accepted, api.JobAccepted), accepted
        # The copy of a lab guest lasts about 3 s: killed within it, polled every 20 ms.
        wait_for(lambda: domain.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE, timeout=30,
                 interval=0.02, what="libvirt migrating the guest")
        cloud.agents["a"].daemon.kill()
    finally:
        a.close()
    assert not any(r.get("event") == "domain_migrated" and r.get("vm") == uuid
                   for r in cloud.agents["a"].daemon.records()), "killed after it finished"
    job = cloud.stack.wait_job(accepted.job_id, timeout=90)
    assert job.state == "succeeded", job.details
    row = vm_row(cloud.stack, "runaway")
    assert (row.state, row.host_name) == ("Running", "b")
    assert cloud.held_by("runaway") == {"a": set(), "b": DEVICES}
    assert cloud.agents["b"].hostdevs(uuid) == DEVICES
    console.wait_sees(0x11)
    cloud.agents["a"].restart().wait_log("startup_accepted")
    cloud.settle()
    _destroy(cloud, "runaway")


def test_an_attach_unanswered_on_the_destination_is_retried_after_its_agent_restarts(
        cloud: Cloud) -> None:
    """b's agent is dead: the guest moves, the attach times out; restarted, a retry plugs both."""
    console = _deploy(cloud, "orphan", "lab", on="a")
    uuid = vm_row(cloud.stack, "orphan").uuid
    cloud.agents["b"].daemon.kill()
    job = _migrate(cloud, "orphan", "b")
    assert (job["state"], job["step"]) == ("failed", "attach"), job
    row = vm_row(cloud.stack, "orphan")
    assert (row.state, row.host_name) == ("Running", "b")
    assert cloud.held_by("orphan") == {"a": set(), "b": DEVICES}  # still held for the VM
    assert cloud.agents["b"].hostdevs(uuid) == set()
    cloud.agents["b"].restart().wait_log("startup_accepted")
    retry = cloud.cli_json("vm", "attach-devices", "orphan", "--wait")
    assert retry["state"] == "succeeded", retry
    assert cloud.agents["b"].hostdevs(uuid) == DEVICES
    for slot in (0x10, 0x11):
        console.wait_sees(slot)
    cloud.settle()
    _destroy(cloud, "orphan")
