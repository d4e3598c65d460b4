"""VMs from domain templates end to end: hostdev-mgmt and agents on RabbitMQ and MariaDB.

Two simulated hosts with the network, bridge and base image the example
template names; every step is driven through the ``hostdev`` CLI and checked
in the database and the hosts' state files: a VM gets its own volume,
destroy removes it, and a template naming a base image or a network no host
has fails the job with the reason, devices released and nothing left behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import StackFactory
from tests.support.agent import TEMPLATE_RESOURCES, TEMPLATES
from tests.support.e2e_stack import Stack

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mariadb, pytest.mark.libvirt]

TEMPLATE = TEMPLATES / "debian-bond.xml"
RESOURCES = TEMPLATE_RESOURCES


@pytest.fixture(scope="module")
def stack(make_e2e_stack: StackFactory) -> Iterator[Stack]:
    """One management daemon, hosts tpl-a and tpl-b (two 10GE each, the template's needs)."""
    created = make_e2e_stack(mgmt=1, prefix="e2e-tpl")
    for name in ("tpl-a", "tpl-b"):
        created.start_host(name, {"10GE": 2}, spec_extra=RESOURCES)
    created.wait_hosts_up()
    yield created


def _ok(stack: Stack, *args: str) -> str:
    done = stack.cli(*args)
    assert done.returncode == 0, f"hostdev {' '.join(args)}: {done.stderr}"
    return done.stdout


def _offering(stack: Stack, name: str, template_text: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.xml"
    path.write_text(template_text, encoding="utf-8")
    _ok(stack, "template", "create", name, "--file", str(path))
    _ok(stack, "offering", "create", name, "--pci", "10GE", "--template", name)


def _deploy(stack: Stack, vm: str, offering: str) -> dict[str, Any]:
    """Deploys and waits; returns the finished job (the CLI exits 1 when it failed)."""
    done = stack.cli("vm", "deploy", vm, "--offering", offering, "--wait", "--json")
    job: dict[str, Any] = json.loads(done.stdout)
    assert done.returncode == (0 if job["state"] == "succeeded" else 1), done.stderr
    return job


def _held(stack: Stack) -> int:
    return int(stack.sql("SELECT COUNT(*) AS n FROM op_host_pci_devices "
                         "WHERE instance_id IS NOT NULL")[0]["n"])


def test_a_template_vm_gets_its_own_volume_until_destroyed(stack: Stack,
                                                           tmp_path: Path) -> None:
    """Deploy runs the VM on an overlay named after it; vm show prints its console; destroy
    deletes the volume."""
    _offering(stack, "bond", TEMPLATE.read_text(encoding="utf-8"), tmp_path)
    vm = _deploy(stack, "web1", "bond")
    assert vm["state"] == "succeeded", vm
    uuid = vm["vm_uuid"]
    host = next(h for h in stack.hosts.values() if uuid in h.domains())
    assert host.volumes("images") == [f"{uuid}-vda.qcow2"]
    shown = _ok(stack, "vm", "show", "web1")
    assert f"/var/log/hostdev/console/{uuid}.console.log" in shown
    assert "bond version 1" in shown
    done = stack.cli_json("vm", "destroy", "web1", "--wait")
    assert done["state"] == "succeeded", done
    assert host.volumes("images") == [] and uuid not in host.domains()


@pytest.mark.parametrize(("case", "change", "reason"), [
    ("base image", ("debian-12.qcow2", "missing.qcow2"),
     "has no base image missing.qcow2 in storage pool 'images'"),
    ("network", ("network='default'", "network='nowhere'"),
     "libvirt network 'nowhere' does not exist or is not active"),
])
def test_a_template_no_host_can_serve_fails_cleanly(stack: Stack, tmp_path: Path, case: str,
                                                    change: tuple[str, str],
                                                    reason: str) -> None:
    """The job fails naming what is missing on each host; no device held, nothing left."""
    name = "no-" + case.replace(" ", "-")
    _offering(stack, name, TEMPLATE.read_text(encoding="utf-8").replace(*change), tmp_path)
    held_before = _held(stack)
    job = _deploy(stack, f"vm-{name}", name)
    assert job["state"] == "failed", job
    assert job["details"].count(reason) == 2, job["details"]  # both hosts said why
    assert _held(stack) == held_before
    uuid = job["vm_uuid"]
    for host in stack.hosts.values():
        assert uuid not in host.domains()
        assert not [v for v in host.volumes("images") if v.startswith(uuid)]
