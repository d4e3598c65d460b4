"""The agent's libvirt path on real daemons with a booted guest: start, hot-plug, migration."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import libvirt
import pytest

from hostdev.agent.errors import DetachRefused
from hostdev.agent.handlers import CommandHandlers, Timeouts
from hostdev.agent.lab_host import LabHost
from hostdev.messages.commands import AttachPciDevicesCommand, MigrateCommand, StartCommand
from hostdev.messages.domain_template import console_path_for, render_domain
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import VmSpec
from tests.realvm.conftest import A_DEVICES, B_DEVICES, Hosts
from tests.support.realvm import GUEST_MEMORY_MIB, Console, guest_pci

pytestmark = pytest.mark.realvm

TIMEOUTS = Timeouts(attach_s=20.0, detach_s=20.0, migration_s=120.0)


def _handlers(host: LabHost) -> CommandHandlers:
    return CommandHandlers(host, {a: "10GE" for a in host.stand_ins.addresses}, TIMEOUTS)


def _start(hosts: Hosts, devices: tuple[PciAddress, ...], *,
           refuse_unplug: bool = False) -> tuple[VmSpec, Console]:
    """Starts a guest on host a through the agent's StartCommand handler; waits for its /init."""
    spec = VmSpec(uuid=str(uuid.uuid4()), name=f"lab-{uuid.uuid4().hex[:8]}", cpus=1,
                  memory_mb=GUEST_MEMORY_MIB, pci_devices=devices)
    template = hosts.template(refuse_unplug=refuse_unplug)
    console_path = console_path_for(template, spec.uuid)
    answer = _handlers(hosts.a).start(StartCommand(vm=spec, domain_xml=render_domain(
        template, spec, console_path=console_path)))
    assert answer.result == "ok", answer.details
    console = Console(Path(console_path))
    console.wait_tick_after(0, timeout=90)
    return spec, console


def _slot(host: LabHost, address: PciAddress) -> int:
    return host.stand_ins.guest_slot(address)


def test_a_vm_started_with_two_devices_shows_them_inside_the_guest(hosts: Hosts) -> None:
    """Both devices of a started VM are in its live XML and listed by the guest itself."""
    spec, console = _start(hosts, A_DEVICES)
    tick = console.wait_tick_after(0)
    assert {guest_pci(_slot(hosts.a, a)) for a in A_DEVICES} <= tick.pci
    domain = hosts.a.domain(spec.uuid)
    assert domain is not None
    assert (domain.state, set(domain.hostdevs)) == ("running", set(A_DEVICES))


def test_a_guest_ignoring_shutdown_keeps_running_and_destroy_stops_it(hosts: Hosts) -> None:
    """shutdown waits its timeout on a guest without ACPI power-off; destroy and undefine work."""
    spec, console = _start(hosts, ())
    assert hosts.a.shutdown(spec.uuid, 1.0) == "running"
    hosts.a.destroy(spec.uuid)
    domain = hosts.a.domain(spec.uuid)
    assert domain is not None and domain.state == "stopped"
    stopped_at = console.last()
    hosts.a.undefine(spec.uuid)
    assert hosts.a.domain(spec.uuid) is None
    assert console.last() == stopped_at  # no QEMU writes it any more


def test_attach_and_detach_with_a_cooperating_guest(hosts: Hosts) -> None:
    """An attached device appears in the guest and the config; a detach removes it from both."""
    spec, console = _start(hosts, ())
    address = A_DEVICES[1]
    hosts.a.attach_hostdev(spec.uuid, address, TIMEOUTS.attach_s)
    console.wait_sees(_slot(hosts.a, address))
    assert address in hosts.a.read_devices(hosts.a.domain_xml(spec.uuid, inactive=True))
    hosts.a.detach_hostdev(spec.uuid, address, TIMEOUTS.detach_s)
    console.wait_sees(_slot(hosts.a, address), present=False)
    assert address not in hosts.a.read_devices(hosts.a.domain_xml(spec.uuid))
    assert address not in hosts.a.read_devices(hosts.a.domain_xml(spec.uuid, inactive=True))


def test_a_guest_refusing_to_release_a_device_times_out_and_keeps_it(hosts: Hosts) -> None:
    """A guest without acpiphp keeps the device: DetachRefused, still live, in config, seen."""
    spec, console = _start(hosts, A_DEVICES[:1], refuse_unplug=True)
    started = time.monotonic()
    with pytest.raises(DetachRefused, match=r"did not release 0000:28:00\.1 within 3 s"):
        hosts.a.detach_hostdev(spec.uuid, A_DEVICES[0], 3.0)
    assert time.monotonic() - started >= 3.0
    assert hosts.a.read_devices(hosts.a.domain_xml(spec.uuid)) == A_DEVICES[:1]
    assert hosts.a.read_devices(hosts.a.domain_xml(spec.uuid, inactive=True)) == A_DEVICES[:1]
    assert guest_pci(_slot(hosts.a, A_DEVICES[0])) in console.wait_tick_after(
        console.last().n if console.last() else 0).pci


def test_detach_attach_migration_moves_the_running_guest_and_its_devices(hosts: Hosts) -> None:
    """MigrateCommand detaches, migrates live, the guest keeps counting on b, attach plugs b's."""
    spec, console = _start(hosts, A_DEVICES)
    before = console.wait_tick_after(0)
    answer = _handlers(hosts.a).migrate(MigrateCommand(
        vm_uuid=spec.uuid, destination_guid=str(uuid.uuid4()), destination_uri=hosts.b.uri))
    assert answer.result == "ok", answer.details
    assert set(answer.detached) == set(A_DEVICES)
    assert hosts.a.domain(spec.uuid) is None
    moved = hosts.b.domain(spec.uuid)
    assert moved is not None and (moved.state, moved.hostdevs) == ("running", ())
    after = console.wait_tick_after(before.n + 2)
    numbers = [t.n for t in console.ticks()]
    assert numbers == sorted(numbers), "the guest restarted instead of moving"
    assert not {guest_pci(_slot(hosts.a, a)) for a in A_DEVICES} & after.pci
    attached = _handlers(hosts.b).attach(AttachPciDevicesCommand(vm_uuid=spec.uuid,
                                                                 addresses=B_DEVICES))
    assert attached.result == "ok", attached.details
    for address in B_DEVICES:
        console.wait_sees(_slot(hosts.b, address))
    assert set(hosts.b.read_devices(hosts.b.domain_xml(spec.uuid, inactive=True))) == set(
        B_DEVICES)


def test_a_migration_the_destination_refuses_reattaches_the_devices_on_the_source(
        hosts: Hosts) -> None:
    """The destination refuses (its own domain of that name): the VM stays, devices back in."""
    spec, console = _start(hosts, A_DEVICES)
    squatter = render_domain(hosts.template(), VmSpec(
        uuid=str(uuid.uuid4()), name=spec.name, cpus=1, memory_mb=GUEST_MEMORY_MIB))
    hosts.b.define(squatter)
    answer = _handlers(hosts.a).migrate(MigrateCommand(
        vm_uuid=spec.uuid, destination_guid=str(uuid.uuid4()), destination_uri=hosts.b.uri))
    assert (answer.result, answer.failed_step) == ("error", "migrate"), answer.details
    assert "already exists" in answer.details
    assert set(answer.reattached) == set(A_DEVICES)
    domain = hosts.a.domain(spec.uuid)
    assert domain is not None
    assert (domain.state, set(domain.hostdevs)) == ("running", set(A_DEVICES))
    for address in A_DEVICES:
        console.wait_sees(_slot(hosts.a, address))
    with pytest.raises(libvirt.libvirtError):
        hosts.b.conn.lookupByUUIDString(spec.uuid)
