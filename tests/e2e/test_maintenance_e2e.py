"""Host maintenance end to end: ``hostdev host maintenance`` against daemons as processes.

Two ``hostdev-mgmt`` and three ``hostdev-agent`` processes on persistent
simulated hosts (four 10GE each; host a resets every device a VM lets go of).
Host a runs two VMs whose offering allows detach-attach migration and one
whose offering forbids it; the operator drives everything with the CLI.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from hostdev.messages import api
from tests.e2e.conftest import StackFactory
from tests.support.e2e_stack import Stack
from tests.support.migration_e2e import database, deploy, hostdevs, settle, vm_row
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mariadb, pytest.mark.libvirt, pytest.mark.slow]

A_DEVICES = ("0000:28:00.0", "0000:28:00.1", "0000:28:00.2", "0000:28:00.3")


@pytest.fixture(scope="module")
def stack(make_e2e_stack: StackFactory) -> Iterator[Stack]:
    """Two management daemons, hosts a (resets released devices), b and c; two offerings."""
    created = make_e2e_stack(mgmt=2, prefix="maint")
    created.start_host("a", {"10GE": 4}, agent_properties={"pci.reset.on.release": "true"})
    for name in ("b", "c"):
        created.start_host(name, {"10GE": 4})
    created.wait_hosts_up()
    created.request(api.CreateOfferingRequest(name="mig", pci_devices="10GE",
                                              migration_policy="detach-attach"))
    created.request(api.CreateOfferingRequest(name="pin", pci_devices="10GE",
                                              migration_policy="forbid"))
    yield created


@pytest.fixture
def db(stack: Stack) -> Iterator[Engine]:
    """An engine on the stack's database."""
    with database(stack) as engine:
        yield engine


def _host(stack: Stack, name: str) -> dict[str, object]:
    found: dict[str, object] = stack.cli_json("host", "show", name)
    return found


def test_maintenance_of_a_host_with_both_migration_policies(stack: Stack, db: Engine) -> None:
    """Dry run, a run that moves the detach-attach VMs, --stop for the rest, activate."""
    uuids = {name: deploy(stack, name, offering, on="a")
             for name, offering in (("m1", "mig"), ("m2", "mig"), ("f1", "pin"))}
    held = {name: {str(a) for a in vm_row(stack, name).pci_devices} for name in uuids}

    plan = stack.cli("host", "maintenance", "a", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "would move 2 VM(s), 1 forbid migration; nothing was changed" in plan.stdout
    for name in ("m1", "m2"):
        (source,) = held[name]
        assert any(line.startswith(name) and source in line for line in plan.stdout.splitlines())
    forbid = plan.stdout.split("forbids migration")[1]
    assert "f1" in forbid and "pin" in forbid and "m1" not in forbid
    assert _host(stack, "a")["status"] == "Up"
    assert {n: vm_row(stack, n).host_name for n in uuids} == dict.fromkeys(uuids, "a")

    run = stack.cli("host", "maintenance", "a", "--wait")
    assert run.returncode == 1, run.stdout  # f1 forbids migration: the host waits for it
    assert "f1" in run.stderr and "--stop" in run.stderr
    for name in ("m1", "m2"):
        row = vm_row(stack, name)
        assert row.state == "Running" and row.host_name in ("b", "c")
        assert hostdevs(stack, row.host_name or "", uuids[name]) == {
            str(a) for a in row.pci_devices}
        assert hostdevs(stack, "a", uuids[name]) == set()
    shown = _host(stack, "a")
    assert shown["status"] == "PrepareForMaintenance"
    assert "VM f1" in str(shown["status_reason"])
    refused = stack.cli("vm", "deploy", "late", "--offering", "mig", "--avoid", "b",
                        "--avoid", "c")
    assert refused.returncode == 1 and "a is PrepareForMaintenance" in refused.stderr

    done = stack.cli("host", "maintenance", "a", "--stop", "--wait")
    assert done.returncode == 0, done.stderr + done.stdout
    assert vm_row(stack, "f1").state == "Stopped"
    assert _host(stack, "a")["status"] == "Maintenance"
    # Every device a guest had on a was reset by its agent before it is free again.
    wait_for(lambda: all(d["state"] == "free" for d in stack.cli_json("devices", "--host", "a")),
             timeout=20, what="a's devices reset and free")
    agent = stack.hosts["a"].daemon
    for address in set().union(*held.values()):
        agent.wait_log("pci_device_reset", timeout=5, address=address)
    assert set().union(*held.values()) <= set(A_DEVICES)

    # A restarted agent announces itself again: the host stays in maintenance.
    stack.hosts["a"].kill()
    restarted = stack.hosts["a"].restart()
    restarted.wait_log("startup_accepted", timeout=30)
    assert _host(stack, "a")["status"] == "Maintenance"

    back = stack.cli("host", "activate", "a")
    assert back.returncode == 0, back.stderr
    assert _host(stack, "a")["status"] == "Up"
    assert deploy(stack, "again", "mig", on="a")
    settle(stack, db)
