"""Benchmarks detach-attach live migration against plain libvirt migration, on real QEMU.

Runs on the real tier's lab (tests/support/realvm.py: two libvirtd daemons,
QEMU/TCG, the booted lab guest; set up on first use, torn down after; needs
root). The agent's own code does the work: ``CommandHandlers`` on a
``LabHost`` per daemon, as ``hostdev-agent`` with ``lab.emulated.devices``
runs it.

- ``detach_attach_migration_s_p50``: from ``MigrateCommand`` handed to the
  source's handler (detach both devices, live-migrate) to the destination's
  ``AttachPciDevicesAnswer`` (both devices plugged), for a guest with two
  devices, migrated back and forth.
- ``plain_migration_s_p50``: ``LabHost.migrate`` (the same libvirt call and
  flags) of the same guest without devices: the baseline.
- ``detach_attach_over_plain_migration``: their ratio (goal <= 2).
- ``attach_to_guest_visible_s_p50``: an attach until the guest lists the
  device (read from its console, which it writes every 0.2 s).
- ``detach_to_device_removed_s_p50``: a detach until libvirt's
  DEVICE_REMOVED (the device gone from the live XML).

Prints a table, then ``metric=NAME value=NUMBER unit=UNIT`` lines.
Run: ``.venv/bin/python bench/migration.py [--runs 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the lab lives in tests/support

from hostdev.agent.handlers import CommandHandlers, Timeouts
from hostdev.agent.lab_host import LabHost
from hostdev.messages.commands import (
    AttachPciDevicesCommand,
    MigrateCommand,
    StartCommand,
)
from hostdev.messages.domain_template import console_path_for, render_domain
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import VmSpec
from tests.support.realvm import (
    GUEST_MEMORY_MIB,
    Console,
    lab_template,
    real_lab,
)

DEVICES = (PciAddress("28:00.0"), PciAddress("28:00.1"))
TIMEOUTS = Timeouts(attach_s=30.0, detach_s=30.0, migration_s=120.0)


def _start(host: LabHost, template: str, devices: tuple[PciAddress, ...]) -> tuple[str, Console]:
    spec = VmSpec(uuid=str(uuid.uuid4()), name=f"bench-{uuid.uuid4().hex[:8]}", cpus=1,
                  memory_mb=GUEST_MEMORY_MIB, pci_devices=devices)
    console_path = console_path_for(template, spec.uuid)
    answer = CommandHandlers(host, dict.fromkeys(DEVICES, "10GE"), TIMEOUTS).start(
        StartCommand(vm=spec, domain_xml=render_domain(template, spec,
                                                       console_path=console_path)))
    if answer.result != "ok":
        raise SystemExit(f"bench: the guest did not start: {answer.details}")
    console = Console(Path(console_path))
    console.wait_tick_after(0, timeout=90)
    return spec.uuid, console


def _remove(host: LabHost, vm: str) -> None:
    host.destroy(vm)
    host.undefine(vm)


def detach_attach(hosts: tuple[LabHost, LabHost], template: str, runs: int) -> list[float]:
    """Times MigrateCommand to AttachPciDevicesAnswer, back and forth."""
    vm, console = _start(hosts[0], template, DEVICES)
    times = []
    for run in range(runs):
        source, destination = hosts[run % 2], hosts[(run + 1) % 2]
        started = time.perf_counter()
        migrated = CommandHandlers(source, dict.fromkeys(DEVICES, "10GE"), TIMEOUTS).migrate(
            MigrateCommand(vm_uuid=vm, destination_guid=str(uuid.uuid4()),
                           destination_uri=destination.uri))
        attached = CommandHandlers(destination, dict.fromkeys(DEVICES, "10GE"),
                                   TIMEOUTS).attach(AttachPciDevicesCommand(vm_uuid=vm,
                                                                            addresses=DEVICES))
        times.append(time.perf_counter() - started)
        if migrated.result != "ok" or attached.result != "ok":
            raise SystemExit(f"bench: run {run} failed: {migrated.details} {attached.details}")
        for address in DEVICES:  # the guest sees them before the next run moves it again
            console.wait_sees(destination.stand_ins.guest_slot(address))
    _remove(hosts[runs % 2], vm)
    return times


def plain(hosts: tuple[LabHost, LabHost], template: str, runs: int) -> list[float]:
    """Times LabHost.migrate of a guest without devices, back and forth."""
    vm, _console = _start(hosts[0], template, ())
    times = []
    for run in range(runs):
        source, destination = hosts[run % 2], hosts[(run + 1) % 2]
        started = time.perf_counter()
        source.migrate(vm, destination.uri, TIMEOUTS.migration_s)
        times.append(time.perf_counter() - started)
    _remove(hosts[runs % 2], vm)
    return times


def hot_plug(host: LabHost, template: str, runs: int) -> tuple[list[float], list[float]]:
    """Times attach until the guest lists the device, and detach until DEVICE_REMOVED."""
    vm, console = _start(host, template, ())
    address = DEVICES[0]
    slot = host.stand_ins.guest_slot(address)
    visible, removed = [], []
    for _ in range(runs):
        started = time.perf_counter()
        host.attach_hostdev(vm, address, TIMEOUTS.attach_s)
        console.wait_sees(slot)
        visible.append(time.perf_counter() - started)
        started = time.perf_counter()
        host.detach_hostdev(vm, address, TIMEOUTS.detach_s)
        removed.append(time.perf_counter() - started)
        console.wait_sees(slot, present=False)
    _remove(host, vm)
    return visible, removed


def main() -> int:
    """Sets up the lab, runs the three measurements, prints the table and metrics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="migrations per kind (default 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hostdev-bench-migration-") as work, \
            real_lab(Path(work)) as lab:
        consoles = Path(work) / "consoles"
        consoles.mkdir()
        template = lab_template(lab.guest, consoles)
        hosts = (LabHost(lab.a.uri, DEVICES), LabHost(lab.b.uri, DEVICES))
        for host in hosts:
            host.open()
        try:
            with_devices = detach_attach(hosts, template, args.runs)
            without = plain(hosts, template, args.runs)
            visible, removed = hot_plug(hosts[0], template, args.runs)
        finally:
            for host in hosts:
                host.close()
    p50 = {name: statistics.median(values) for name, values in (
        ("detach_attach_migration_s_p50", with_devices), ("plain_migration_s_p50", without),
        ("attach_to_guest_visible_s_p50", visible),
        ("detach_to_device_removed_s_p50", removed))}
    print(f"{'measure':34} {'p50 s':>8} {'min s':>8} {'max s':>8}  runs")
    for (name, value), values in zip(p50.items(), (with_devices, without, visible, removed),
                                     strict=True):
        print(f"{name:34} {value:8.3f} {min(values):8.3f} {max(values):8.3f}  {len(values)}")
    for name, value in p50.items():
        print(f"metric={name} value={value:.3f} unit=s")
    ratio = p50["detach_attach_migration_s_p50"] / p50["plain_migration_s_p50"]
    print(f"metric=detach_attach_over_plain_migration value={ratio:.2f} unit=ratio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
