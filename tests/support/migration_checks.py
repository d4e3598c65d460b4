"""The invariants every migration outcome must leave, checked against DB and hypervisors."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DomainInfo
from hostdev.mgmt.devices.device_rows import address_of
from hostdev.mgmt.persistence.models import Host, Job, PciDevice, VmInstance


def violations(engine: Engine, domains: Mapping[str, Sequence[DomainInfo]]) -> list[str]:
    """Returns every broken invariant (empty when all hold).

    Args:
        engine: the management database.
        domains: every host's domains by host guid, as its hypervisor lists them.
    """
    found: list[str] = []
    with Session(engine) as session:
        hosts = {h.id: h.guid for h in session.scalars(select(Host))}
        vms = {vm.id: vm for vm in session.scalars(select(VmInstance))}
        devices = list(session.scalars(select(PciDevice)))
        in_flight = {job.vm_id for job in session.scalars(
            select(Job).where(Job.state == "running"))}
        migrating = {job.vm_id: json.loads(job.payload) for job in session.scalars(
            select(Job).where(Job.state == "running", Job.kind == "migrate"))}
    by_place = {(d.host_id, address_of(d)): d for d in devices}
    # 1. No device is held by two VMs: in the database and in the running domains.
    for guid, listed in domains.items():
        seen: dict[PciAddress, str] = {}
        for domain in listed:
            if domain.state not in ("running", "paused"):
                continue
            for address in domain.hostdevs:
                if address in seen:
                    found.append(f"{guid}: {address} is in domains {seen[address]} and "
                                 f"{domain.uuid}")
                seen[address] = domain.uuid
    for device in devices:
        if device.instance_id is not None and device.reserved_for is not None \
                and device.instance_id != device.reserved_for:
            found.append(f"device {device.id} is held by VM {device.instance_id} and "
                         f"reserved for VM {device.reserved_for}")
        # 2. No device is reserved without a job in flight.
        if (device.state == "reserved" or device.reserved_for is not None) \
                and device.reserved_for not in migrating:
            found.append(f"device {device.id} ({address_of(device)}) is reserved for VM "
                         f"{device.reserved_for} with no migration in flight")
    for vm in vms.values():
        if vm.state == "Destroyed":
            continue
        held = [d for d in devices if d.instance_id == vm.id]
        busy = vm.id in in_flight
        # 3. The VM's devices are on the host the VM is on.
        if not busy:
            for device in held:
                if device.host_id != vm.host_id:
                    found.append(f"VM {vm.name} is on host {vm.host_id} but holds device "
                                 f"{address_of(device)} of host {device.host_id}")
        # 4. The VM's state matches its host's (simulated) libvirt state.
        running_on = [guid for guid, listed in domains.items()
                      for d in listed if d.uuid == vm.uuid and d.state in ("running", "paused")]
        if busy:
            continue
        if vm.state == "Running":
            guid = hosts.get(vm.host_id or -1)
            if running_on != [guid]:
                found.append(f"VM {vm.name} is Running on {guid} but runs on {running_on}")
            for domain in domains.get(guid or "", ()):
                if domain.uuid != vm.uuid:
                    continue
                for address in domain.hostdevs:
                    device = by_place.get((vm.host_id or -1, address))
                    if device is None or device.instance_id != vm.id:
                        found.append(f"VM {vm.name}'s domain holds {address}, which the "
                                     "database does not give it")
        elif vm.state in ("Stopped", "Error") and running_on:
            found.append(f"VM {vm.name} is {vm.state} but runs on {running_on}")
        elif vm.state in ("Starting", "Stopping", "Migrating"):
            found.append(f"VM {vm.name} is {vm.state} with no job in flight")
    return found


def check_invariants(engine: Engine, domains: Mapping[str, Sequence[DomainInfo]]) -> None:
    """Fails with every broken invariant listed."""
    broken = violations(engine, domains)
    assert not broken, "invariants broken:\n" + "\n".join(broken)
