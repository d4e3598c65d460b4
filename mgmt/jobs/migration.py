"""Live migration of VMs holding PCI devices (detach-attach), as a persistent job.

Steps of a ``migrate`` job:

1. ``begin``: the destination (named, or the planner's first fit avoiding the
   source) gets the same device names reserved while the VM keeps its source
   set; the VM becomes Migrating; ``MigrateCommand`` goes to the source agent.
2. The source answers (or the destination reports the domain running): on
   success the source set is freed and the reserved set allocated
   (``commit_migration``), the VM is moved to the destination and
   ``AttachPciDevicesCommand`` goes to the destination agent (step ``attach``);
   on failure the reservations are freed (``abort_migration``) and the VM is
   Running on the source with its devices (the agent re-attached them; its
   answer says which it could not).
3. The attach answer ends the job: the VM is Running; devices not attached
   stay held and are named by the job (retry: ``AttachVmDevicesRequest``).

Nothing is decided on a guess. A ``migrate`` step without an answer by its
deadline moves to ``verify``: the job stays in flight, holding both sets,
until a host's start-up, ping or lifecycle report says where the domain runs
(``hostdev.mgmt.jobs.migration_recovery``, built on this module). Any
management daemon can advance any job (rows locked, transitions conditional,
commit and abort idempotent).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import structlog

from hostdev.messages.api import MigrationPlan
from hostdev.messages.commands import (
    AttachPciDevicesAnswer,
    AttachPciDevicesCommand,
    MigrateAnswer,
    MigrateCommand,
)
from hostdev.messages.events import PciDeviceAllocated, PciDeviceReleased
from hostdev.messages.pci_address import PciAddress
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.devices import cleaning, numa, pci_devices
from hostdev.mgmt.devices.device_rows import ALLOCATED, QUARANTINED
from hostdev.mgmt.devices.pci_devices import ClaimRaceLost, HeldDevice, InsufficientDevices
from hostdev.mgmt.errors import Conflict, InvalidRequest, NoCapacity
from hostdev.mgmt.jobs import engine
from hostdev.mgmt.jobs.jobs import find_host, find_vm
from hostdev.mgmt.jobs.migration_plan import (
    STEP_ATTACH,
    STEP_MIGRATE,
    STEP_REATTACH,
    STEP_VERIFY,
    check_policy,
    describe_missing,
    failed_attaches,
    missing_after_rollback,
    pair_devices,
)
from hostdev.mgmt.jobs.payloads import (
    ATTACH_JOB,
    MIGRATE_JOB,
    AttachPayload,
    MigratePayload,
    load,
    store,
)
from hostdev.mgmt.persistence.models import (
    Host,
    Job,
    ServiceOffering,
    VmInstance,
    utcnow,
)
from hostdev.mgmt.persistence.unit_of_work import TxContext
from hostdev.mgmt.placement import planner
from hostdev.mgmt.vms import capacity
from hostdev.mgmt.vms.vm_lifecycle import (
    StaleVmState,
    VmLifecycleManager,
    host_guid_of,
    offering_numa_policy,
    offering_requests,
)
from hostdev.mgmt.vms.vm_states import VmEvent

log = structlog.get_logger()


class MigrationManager:
    """Begins migrations and re-attaches, and advances them from answers, reports, deadlines."""

    def __init__(self, config: MgmtConfig, lifecycle: VmLifecycleManager) -> None:
        self._config = config
        self.lifecycle = lifecycle

    # -- planning ------------------------------------------------------------------

    def _prepare(self, tx: TxContext, ref: str, destination: str | None
                 ) -> tuple[VmInstance, Host, list[planner.Candidate], list[HeldDevice]]:
        vm = find_vm(tx.session, ref)
        if vm.state != "Running" or vm.host_id is None:
            raise Conflict(f"VM {vm.name} is {vm.state}; only a Running VM migrates (wait for "
                           "its current job: hostdev job list)")
        source = tx.session.get(Host, vm.host_id)
        assert source is not None
        offering = tx.session.get(ServiceOffering, vm.offering_id)
        assert offering is not None
        held = [d for d in pci_devices.devices_of_vm(tx.session.connection(), vm.id)
                if d.host_id == source.id]
        check_policy(vm.name, offering.name, offering.migration_policy, held)
        demand = planner.Demand(cpus=vm.cpus, memory_mb=vm.memory_mb,
                                pci=offering_requests(tx, vm.offering_id),
                                numa=offering_numa_policy(tx, vm.offering_id))
        names = [r.name for r in demand.pci]
        if destination is not None:
            host = find_host(tx.session, destination)
            if host.id == source.id:
                raise InvalidRequest(f"VM {vm.name} already runs on {host.name}; name another "
                                     "host with --to, or leave it out to let placement choose")
            capacity = [h for h in planner.read_capacities(tx.session, names) if h.id == host.id]
            verdict = planner.verdict(capacity[0], demand) if capacity else None
            if verdict is None or not verdict.accepted:
                reason = verdict.reason if verdict else "is not registered"
                raise NoCapacity(f"cannot migrate VM {vm.name} to {host.name}: {reason}")
            candidates = [planner.Candidate(id=host.id, guid=host.guid, name=host.name)]
        else:
            candidates = planner.find_hosts(tx.session, demand, avoid={source.guid})
            if not candidates:
                hosts = planner.read_capacities(tx.session, names)
                raise NoCapacity(f"cannot migrate VM {vm.name}: "
                                 + planner.refusal(demand, hosts, {source.guid}))
        return vm, source, candidates, held

    def plan(self, tx: TxContext, ref: str, destination: str | None, *,
             taken: set[tuple[int, PciAddress]] | None = None) -> MigrationPlan:
        """Says where a VM would go and which device replaces which; changes nothing.

        ``taken`` holds the (host id, address) of destination devices that
        plans made before this one chose (a host's maintenance plans its VMs
        in turn): they are not offered again, and this plan's are added.
        """
        vm, source, candidates, held = self._prepare(tx, ref, destination)
        taken = set() if taken is None else taken
        conn = tx.session.connection()
        requests = {r.name: r.count for r in offering_requests(tx, vm.offering_id)}
        policy = offering_numa_policy(tx, vm.offering_id)
        for target in candidates:
            node = numa.node_for(conn, target.id, requests, policy, prefer=vm.numa_node)
            spare = [d for d in pci_devices.free_devices(conn, target.id, node)
                     if (target.id, d.address) not in taken]  # where begin() would reserve
            mapping = pair_devices(held, spare)
            if len(mapping) == len(held):
                break
        else:
            raise NoCapacity(f"cannot migrate VM {vm.name}: the free devices of every "
                             "destination are taken by the moves planned before it")
        taken.update((target.id, m.destination) for m in mapping)
        return MigrationPlan(vm_uuid=vm.uuid, source_guid=source.guid,
                             destination_guid=target.guid,
                             devices=mapping,
                             details=f"{vm.name}: {source.name} -> {target.name}")

    # -- beginning -----------------------------------------------------------------

    def begin(self, tx: TxContext, ref: str, destination: str | None) -> Job:
        """Reserves the destination set, moves the VM to Migrating, sends MigrateCommand."""
        with tx.session.no_autoflush:
            vm, source, candidates, held = self._prepare(tx, ref, destination)
            requests = {r.name: r.count for r in offering_requests(tx, vm.offering_id)}
            policy = offering_numa_policy(tx, vm.offering_id)
            conn = tx.session.connection()
            refusals: list[str] = []  # why each destination did not take it
            for candidate in candidates:
                target = tx.session.get(Host, candidate.id)
                assert target is not None
                if not target.migration_uri:
                    log.info("migration_host_skipped", host=target.guid,
                             reason="announced no migration URI")
                    refusals.append(f"{target.name} announced no migration URI")
                    continue
                try:
                    # The node the VM is on first: its memory binding travels with it.
                    reserved, node = numa.take_on_node(conn, vm.id, target.id, requests, policy,
                                                       reserve=True, prefer=vm.numa_node)
                except InsufficientDevices as exc:
                    log.info("migration_host_refused", vm=vm.uuid, host=target.guid,
                             reason=str(exc))
                    refusals.append(f"{target.name} {exc.detail}")
                    continue
                except ClaimRaceLost:
                    if any(d.host_id == target.id
                           for d in pci_devices.devices_of_vm(conn, vm.id)):
                        raise  # part of a reservation was written: a new transaction
                    refusals.append(f"{target.name} was taken meanwhile")
                    continue
                # Only ``required`` binds the guest's memory, on the destination too.
                return self._start(tx, vm, source, target, held, reserved, node,
                                   node if policy == "required" else None)
        raise NoCapacity(f"cannot migrate VM {vm.name}: no destination takes it: "
                         + "; ".join(refusals))

    def _start(self, tx: TxContext, vm: VmInstance, source: Host, target: Host,
               held: list[HeldDevice], reserved: Sequence[HeldDevice],
               numa_node: int | None, bind_to: int | None) -> Job:
        self.lifecycle.transition(tx, vm, VmEvent.MIGRATION_REQUESTED)
        detach_s = 10.0
        budget = self._config.job_migrate_timeout_s
        command = MigrateCommand(vm_uuid=vm.uuid, destination_guid=target.guid,
                                 destination_uri=target.migration_uri,
                                 detach_timeout_s=detach_s, numa_node=bind_to,
                                 migrate_timeout_s=max(1.0, budget * 0.75
                                                       - detach_s * len(held)))
        mapping = pair_devices(held, reserved)
        payload = MigratePayload(
            source=source.guid, source_id=source.id, source_name=source.name,
            destination=target.guid, destination_id=target.id, destination_name=target.name,
            mapping=[[m.name, str(m.source), str(m.destination)] for m in mapping],
            numa_node=numa_node)
        job = engine.new_job(tx, MIGRATE_JOB, vm, STEP_MIGRATE, payload,
                             utcnow() + timedelta(seconds=budget))
        engine.send(tx, job, source.guid, command)
        tx.session.flush()
        log.info("migration_started", job=job.id, vm=vm.uuid, source=source.guid,
                 destination=target.guid, devices=len(held))
        return job

    def attach_devices(self, tx: TxContext, ref: str) -> Job:
        """Sends AttachPciDevicesCommand for every device a Running VM holds on its host."""
        vm = find_vm(tx.session, ref)
        if vm.state != "Running" or vm.host_id is None:
            raise Conflict(f"VM {vm.name} is {vm.state}; devices are re-attached only to a "
                           "Running VM")
        addresses = self.held_on(tx, vm, vm.host_id)
        if not addresses:
            raise Conflict(f"VM {vm.name} holds no PCI device on its host; nothing to attach")
        guid = host_guid_of(tx, vm.host_id)
        payload = AttachPayload()
        job = engine.new_job(tx, ATTACH_JOB, vm, STEP_ATTACH, payload, None)
        self._send_attach(tx, job, payload, vm, guid, addresses)
        tx.session.flush()
        return job

    def held_on(self, tx: TxContext, vm: VmInstance, host_id: int) -> tuple[PciAddress, ...]:
        """Returns the addresses of the devices ``vm`` holds (not merely reserves) on a host."""
        return tuple(sorted((d.address for d in pci_devices.devices_of_vm(tx.session.connection(),
                                                                          vm.id)
                             if d.host_id == host_id and d.state in (ALLOCATED, QUARANTINED)),
                            key=str))

    def _send_attach(self, tx: TxContext, job: Job, payload: AttachPayload,
                     vm: VmInstance, guid: str, addresses: Sequence[PciAddress]) -> None:
        timeout = self._config.job_attach_timeout_s
        per_device = max(1.0, timeout / (2 * max(1, len(addresses))))
        engine.send(tx, job, guid,
                    AttachPciDevicesCommand(vm_uuid=vm.uuid, addresses=tuple(addresses),
                                            timeout_s=min(10.0, per_device)))
        payload.attach_host = guid
        payload.attach = [str(a) for a in addresses]
        store(job, payload)
        job.deadline = utcnow() + timedelta(seconds=timeout)

    # -- answers -------------------------------------------------------------------

    def on_migrate_answer(self, tx: TxContext, answer: MigrateAnswer,
                          correlation_id: str | None, sender: str | None) -> Job | None:
        """Advances a migration from the source's answer; a stale answer changes nothing."""
        job, vm = engine.job_for_answer(tx, answer, correlation_id, sender)
        if job is None or vm is None or job.kind != MIGRATE_JOB \
                or job.step not in (STEP_MIGRATE, STEP_VERIFY):
            return None
        if answer.ok:
            self.migrated(tx, job, vm, "the source agent reported the migration done")
            return job
        missing = missing_after_rollback(answer.detached, answer.reattached)
        step = answer.failed_step or STEP_MIGRATE
        self.roll_back(tx, job, vm, step, answer.details, missing)
        return job

    def on_attach_answer(self, tx: TxContext, answer: AttachPciDevicesAnswer,
                         correlation_id: str | None, sender: str | None) -> Job | None:
        """Ends a migration's attach (or re-attach) step, or an attach-devices job."""
        job, vm = engine.job_for_answer(tx, answer, correlation_id, sender)
        if job is None or vm is None:
            return None
        if job.kind == MIGRATE_JOB and job.step in (STEP_ATTACH, STEP_REATTACH):
            migration = load(job, MigratePayload)
            addresses = [PciAddress(a) for a in migration.attach]
            failed = failed_attaches(addresses, answer.devices, answer.ok)
            host_name = migration.destination_name
            if job.step == STEP_ATTACH:
                self.lifecycle.transition(tx, vm, VmEvent.OPERATION_SUCCEEDED)
                done = (f"migrated VM {vm.name} from {migration.source_name} to "
                        f"{migration.destination_name}")
                if failed:
                    engine.finish(tx, job, "failed", self.missing_text(
                        vm, done + ", but", host_name, failed), step=STEP_ATTACH)
                else:
                    engine.finish(tx, job, "succeeded",
                                  f"{done} with {len(addresses)} PCI device(s) attached")
                return job
            note = migration.failure or "the migration failed"
            if failed:
                note = self.missing_text(vm, note + "; and", host_name, failed)
            else:
                note += f"; devices re-attached on {migration.source_name}"
            engine.finish(tx, job, "failed", note, step=migration.failed_step or STEP_MIGRATE)
            return job
        if job.kind != ATTACH_JOB:
            return None
        attach = load(job, AttachPayload)
        addresses = [PciAddress(a) for a in attach.attach]
        failed = failed_attaches(addresses, answer.devices, answer.ok)
        if failed:
            engine.finish(tx, job, "failed", self.missing_text(vm, "still", attach.attach_host,
                                                               failed), step=STEP_ATTACH)
        else:
            engine.finish(tx, job, "succeeded",
                          f"{len(addresses)} PCI device(s) attached to VM {vm.name}")
        return job

    @staticmethod
    def missing_text(vm: VmInstance, lead: str, host: object,
                      failed: Sequence[tuple[PciAddress, str]]) -> str:
        return (f"{lead} devices not attached on {host}: {describe_missing(failed)}; they stay "
                f"held for VM {vm.name}: fix the cause, then retry with "
                f"`hostdev vm attach-devices {vm.name}`")

    # -- outcomes ------------------------------------------------------------------

    def migrated(self, tx: TxContext, job: Job, vm: VmInstance, how: str) -> None:
        payload = load(job, MigratePayload)
        source_id, target_id = payload.source_id, payload.destination_id
        conn = tx.session.connection()
        before = pci_devices.devices_of_vm(conn, vm.id)
        pci_devices.commit_migration(conn, vm.id, source_id, target_id)
        cleaning.request_resets_on(tx, {source_id})  # the source set, on a host that resets
        if not capacity.move_to_host(conn, vm, target_id, payload.numa_node):
            raise StaleVmState(f"VM {vm.name} changed while its migration was committed; "
                               "retrying")
        tx.session.refresh(vm)
        at = utcnow().isoformat() + "Z"
        for device in before:
            guid = host_guid_of(tx, device.host_id)
            event: PciDeviceReleased | PciDeviceAllocated
            if device.host_id == source_id:
                event = PciDeviceReleased(host_guid=guid, address=device.address,
                                          name=device.name, vm_uuid=vm.uuid, at=at)
                tx.outbox.add(f"pci.{guid}.Released", event)
            elif device.host_id == target_id:
                event = PciDeviceAllocated(host_guid=guid, address=device.address,
                                           name=device.name, vm_uuid=vm.uuid, at=at)
                tx.outbox.add(f"pci.{guid}.Allocated", event)
        log.info("migration_committed", job=job.id, vm=vm.uuid, how=how,
                 destination=payload.destination)
        addresses = self.held_on(tx, vm, target_id)
        job.step = STEP_ATTACH
        if not addresses:
            self.lifecycle.transition(tx, vm, VmEvent.OPERATION_SUCCEEDED)
            engine.finish(tx, job, "succeeded", f"migrated VM {vm.name} from "
                          f"{payload.source_name} to {payload.destination_name}")
            return
        self._send_attach(tx, job, payload, vm, payload.destination, addresses)

    def roll_back(self, tx: TxContext, job: Job, vm: VmInstance, step: str, reason: str,
                   missing: Sequence[PciAddress]) -> None:
        payload = load(job, MigratePayload)
        freed = pci_devices.abort_migration(tx.session.connection(), vm.id,
                                            payload.destination_id)
        self.lifecycle.transition(tx, vm, VmEvent.OPERATION_FAILED)
        text = (f"migration of VM {vm.name} to {payload.destination_name} failed at step "
                f"{step}: {reason}; {freed} reserved device(s) on "
                f"{payload.destination_name} freed; the VM runs on "
                f"{payload.source_name} with its devices")
        log.warning("migration_rolled_back", job=job.id, vm=vm.uuid, step=step, reason=reason,
                    missing=[str(a) for a in missing])
        if missing:
            payload.failure, payload.failed_step = text, step
            job.step = STEP_REATTACH
            self._send_attach(tx, job, payload, vm, payload.source, missing)
            return
        engine.finish(tx, job, "failed", text, step=step)
