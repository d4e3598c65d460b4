"""Live migration with PCI devices, end to end: the fault-injection matrix of issue 6.

Two ``hostdev-mgmt`` and three ``hostdev-agent`` processes (persistent
simulated hosts that migrate through each other's mailboxes) on a vhost and a
MariaDB database of their own. Each case deploys a VM with two 10GE devices,
injects one fault, migrates, checks the outcome, then checks the invariants:
no device held by two VMs, no device reserved without a job in flight, the
VM's devices on the VM's host, the VM's state matching its host's libvirt.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from hostdev.messages import api
from tests.e2e.conftest import StackFactory
from tests.support.e2e_stack import Stack
from tests.support.migration_e2e import (
    database,
    deploy,
    hostdevs,
    mgmt_that_began,
    migrate,
    set_faults,
    set_faults_file_only,
    settle,
    vm_row,
)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mariadb, pytest.mark.libvirt, pytest.mark.slow]

HOSTS = ("a", "b", "c")
A_DEVICES = {"0000:28:00.0", "0000:28:00.1"}  # the first two 10GE functions of any host


@pytest.fixture(scope="module")
def stack(make_e2e_stack: StackFactory) -> Iterator[Stack]:
    """Two management daemons and three hosts with four 10GE each; short timeouts."""
    created = make_e2e_stack(mgmt=2, prefix="migration", mgmt_properties={
        "job.migrate.timeout": "15s", "job.attach.timeout": "4s"})
    for name in HOSTS:
        created.start_host(name, {"10GE": 4}, agent_properties={"timeout.detach": "300ms",
                                                                 "timeout.attach": "2s"})
    created.wait_hosts_up()
    created.request(api.CreateOfferingRequest(name="net2", pci_devices="10GE,10GE",
                                              migration_policy="detach-attach"))
    created.request(api.CreateOfferingRequest(name="net2-pinned", pci_devices="10GE,10GE",
                                              migration_policy="forbid"))
    yield created


@pytest.fixture
def db(stack: Stack) -> Iterator[Engine]:
    """An engine on the stack's database; every host's faults cleared after the test."""
    with database(stack) as engine:
        yield engine
    for host in stack.hosts.values():
        if host.running:
            set_faults(host)


def _destroy(stack: Stack, name: str) -> None:
    accepted = stack.request(api.DestroyVmRequest(vm=name))
    assert isinstance(accepted, api.JobAccepted)
    assert stack.wait_job(accepted.job_id).state == "succeeded"


def test_success_moves_vm_and_devices(stack: Stack, db: Engine) -> None:
    """Dry run changes nothing; the migration runs the VM on b with b's devices attached."""
    uuid = deploy(stack, "ok1", "net2", on="a")
    plan = stack.cli("vm", "migrate", "ok1", "--to", "b", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "0000:28:00.0" in plan.stdout and "nothing was changed" in plan.stdout
    assert vm_row(stack, "ok1").host_name == "a"
    done = stack.cli("vm", "migrate", "ok1", "--to", "b", "--wait")
    assert done.returncode == 0, done.stderr + done.stdout
    row = vm_row(stack, "ok1")
    assert (row.state, row.host_name) == ("Running", "b")
    assert hostdevs(stack, "b", uuid) == A_DEVICES and hostdevs(stack, "a", uuid) == set()
    settle(stack, db)
    _destroy(stack, "ok1")


def test_forbid_policy_is_refused_naming_devices(stack: Stack, db: Engine) -> None:
    """Policy forbid: the CLI fails naming the devices and the policy; nothing moves."""
    deploy(stack, "pinned", "net2-pinned", on="a")
    done = stack.cli("vm", "migrate", "pinned", "--to", "b")
    assert done.returncode == 1
    assert "0000:28:00.0 (10GE)" in done.stderr and "'forbid'" in done.stderr
    assert vm_row(stack, "pinned").state == "Running"
    settle(stack, db)
    _destroy(stack, "pinned")


@pytest.mark.parametrize("refused", ["0000:28:00.0", "0000:28:00.1"])
def test_detach_refused_by_guest_rolls_back(stack: Stack, db: Engine, refused: str) -> None:
    """The guest keeps the first (or second) device: fails at detach, VM whole on a."""
    uuid = deploy(stack, "stubborn", "net2", on="a")
    set_faults(stack.hosts["a"], refuse_detach=[refused])
    job = stack.wait_job(migrate(stack, "stubborn", "b"))
    assert (job.state, job.step) == ("failed", "detach"), job.details
    assert refused in job.details and "freed" in job.details
    row = vm_row(stack, "stubborn")
    assert (row.state, row.host_name) == ("Running", "a")
    assert hostdevs(stack, "a", uuid) == A_DEVICES
    settle(stack, db)
    _destroy(stack, "stubborn")


def test_libvirt_migration_failure_rolls_back(stack: Stack, db: Engine) -> None:
    """libvirt fails the migration: reservations freed, devices re-attached on a."""
    uuid = deploy(stack, "grounded", "net2", on="a")
    set_faults(stack.hosts["a"], fail_migration="simulated: port 49152 unreachable")
    job = stack.wait_job(migrate(stack, "grounded", "b"))
    assert (job.state, job.step) == ("failed", "migrate"), job.details
    assert "49152 unreachable" in job.details
    assert (vm_row(stack, "grounded").host_name, hostdevs(stack, "a", uuid)) == ("a", A_DEVICES)
    settle(stack, db)
    _destroy(stack, "grounded")


def test_attach_failing_for_one_device_then_retry(stack: Stack, db: Engine) -> None:
    """One device fails to attach on b: VM on b, job names it; attach-devices retries it."""
    uuid = deploy(stack, "partial", "net2", on="a")
    set_faults(stack.hosts["b"], fail_attach=["0000:28:00.1"])
    job = stack.wait_job(migrate(stack, "partial", "b"))
    assert (job.state, job.step) == ("failed", "attach"), job.details
    assert "0000:28:00.1" in job.details and "attach-devices partial" in job.details
    row = vm_row(stack, "partial")
    assert (row.state, row.host_name) == ("Running", "b")
    assert set(map(str, row.pci_devices)) == A_DEVICES  # still held for the VM
    assert hostdevs(stack, "b", uuid) == {"0000:28:00.0"}
    settle(stack, db)
    set_faults(stack.hosts["b"])
    retry = stack.cli("vm", "attach-devices", "partial", "--wait")
    assert retry.returncode == 0, retry.stderr
    assert hostdevs(stack, "b", uuid) == A_DEVICES
    settle(stack, db)
    _destroy(stack, "partial")


def test_destination_agent_dead_before_attach(stack: Stack, db: Engine) -> None:
    """b's agent is dead: the VM lands on b, the attach times out; after b restarts, a retry."""
    uuid = deploy(stack, "orphan", "net2", on="a")
    stack.hosts["b"].kill()
    job = stack.wait_job(migrate(stack, "orphan", "b"), timeout=30)
    assert (job.state, job.step) == ("failed", "attach"), job.details
    assert "no answer" in job.details
    assert (vm_row(stack, "orphan").state, vm_row(stack, "orphan").host_name) == ("Running", "b")
    stack.hosts["b"].restart().wait_log("startup_accepted")  # management saw it come back
    retry = stack.cli("vm", "attach-devices", "orphan", "--wait")
    assert retry.returncode == 0, retry.stderr
    assert hostdevs(stack, "b", uuid) == A_DEVICES
    settle(stack, db)
    _destroy(stack, "orphan")


def test_source_agent_killed_before_hand_over(stack: Stack, db: Engine) -> None:
    """a's agent dies with the devices detached, the VM still on a: its restart rolls back."""
    uuid = deploy(stack, "homebody", "net2", on="a")
    set_faults(stack.hosts["a"], migrate_hold_s=60)
    job_id = migrate(stack, "homebody", "b")
    stack.hosts["a"].daemon.wait_log("simulated_migration_holding", vm=uuid)
    assert hostdevs(stack, "a", uuid) == set()  # detached, not yet moved
    stack.hosts["a"].kill()
    assert stack.job(job_id).state == "running"
    set_faults_file_only(stack.hosts["a"])  # the restarted agent must not hold again
    stack.hosts["a"].restart().wait_log("startup_accepted")
    job = stack.wait_job(job_id, timeout=30)
    assert (job.state, job.step) == ("failed", "migrate"), job.details
    assert "re-attached" in job.details
    row = vm_row(stack, "homebody")
    assert (row.state, row.host_name) == ("Running", "a")
    assert hostdevs(stack, "a", uuid) == A_DEVICES
    settle(stack, db)
    _destroy(stack, "homebody")


def test_source_agent_killed_mid_migration(stack: Stack, db: Engine) -> None:
    """a's agent dies after libvirt handed the VM over: b's report finishes the job."""
    uuid = deploy(stack, "runaway", "net2", on="a")
    set_faults(stack.hosts["a"], migrate_delay_s=60)
    job_id = migrate(stack, "runaway", "b")
    stack.hosts["a"].daemon.wait_log("simulated_migration_handed_over", vm=uuid)
    stack.hosts["a"].kill()
    job = stack.wait_job(job_id, timeout=30)
    assert job.state == "succeeded", job.details
    assert (vm_row(stack, "runaway").host_name, hostdevs(stack, "b", uuid)) == ("b", A_DEVICES)
    stack.hosts["a"].restart().wait_log("startup_accepted")  # management saw it come back
    settle(stack, db)
    _destroy(stack, "runaway")


def test_source_killed_mid_migration_with_destination_down(stack: Stack, db: Engine) -> None:
    """Both agents down mid-migration: a comes back without the VM, then b with it."""
    uuid = deploy(stack, "limbo", "net2", on="a")
    set_faults(stack.hosts["a"], migrate_delay_s=60)
    stack.hosts["b"].kill()
    job_id = migrate(stack, "limbo", "b")
    stack.hosts["a"].daemon.wait_log("simulated_migration_handed_over", vm=uuid, timeout=20)
    stack.hosts["a"].kill()
    set_faults_file_only(stack.hosts["a"])
    stack.hosts["a"].restart().wait_log("startup_accepted")
    row = stack.job(job_id)
    assert (row.state, row.step) == ("running", "verify"), row.details  # both sets held
    stack.hosts["b"].restart().wait_log("startup_accepted")
    job = stack.wait_job(job_id, timeout=30)
    assert job.state == "succeeded", job.details
    assert (vm_row(stack, "limbo").host_name, hostdevs(stack, "b", uuid)) == ("b", A_DEVICES)
    settle(stack, db)
    _destroy(stack, "limbo")


def test_management_daemon_killed_mid_migration(stack: Stack, db: Engine) -> None:
    """The daemon that began the job dies; the other one finishes it."""
    uuid = deploy(stack, "relay", "net2", on="a")
    set_faults(stack.hosts["a"], migrate_delay_s=1.5)
    job_id = migrate(stack, "relay", "c")
    mgmt_that_began(stack, uuid).kill()
    job = stack.wait_job(job_id, timeout=30)
    assert job.state == "succeeded", job.details
    assert (vm_row(stack, "relay").host_name, hostdevs(stack, "c", uuid)) == ("c", A_DEVICES)
    settle(stack, db)
    stack.start_mgmt()
    _destroy(stack, "relay")
