"""Live migration of VMs holding PCI devices (detach-attach), as a persistent job.

Steps of a ``migrate`` job (DESIGN 1.6 and 7):

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
(``hostdev.mgmt.jobs.migration_recovery``). Any management daemon can advance any
job (rows locked, transitions conditional, commit and abort idempotent).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from hostdev.messages.api import MigrationPlan
from hostdev.messages.commands import (
    AttachPciDevicesAnswer,
    AttachPciDevicesCommand,
    MigrateAnswer,
    MigrateCommand,
)
from hostdev.messages.events import JobFinished, PciDeviceAllocated, PciDeviceReleased
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DomainInfo
from hostdev.mgmt import metrics
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.devices import pci_devices
from hostdev.mgmt.devices.pci_devices import ClaimRaceLost, HeldDevice, InsufficientDevices
from hostdev.mgmt.errors import Conflict, InvalidRequest, NoCapacity
from hostdev.mgmt.jobs import migration_recovery
from hostdev.mgmt.jobs.jobs import find_host, find_vm
from hostdev.mgmt.jobs.migration_plan import (
    ATTACH_JOB,
    MIGRATE_JOB,
    STEP_ATTACH,
    STEP_MIGRATE,
    STEP_REATTACH,
    STEP_VERIFY,
    NamedDevice,
    check_policy,
    describe_missing,
    failed_attaches,
    missing_after_rollback,
    pair_devices,
)
from hostdev.mgmt.persistence import outbox
from hostdev.mgmt.persistence.models import (
    Host,
    Job,
    PciDevice,
    ServiceOffering,
    VmInstance,
    utcnow,
)
from hostdev.mgmt.persistence.unit_of_work import REQUEST_KEY
from hostdev.mgmt.placement import planner
from hostdev.mgmt.vms.vm_lifecycle import VmLifecycleManager, host_guid_of, offering_requests
from hostdev.mgmt.vms.vm_states import VmEvent

log = structlog.get_logger()

def _payload(job: Job) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(job.payload or "{}")
    return data


def _named(devices: Sequence[HeldDevice]) -> list[NamedDevice]:
    return [NamedDevice(d.name, d.address) for d in devices]


class MigrationManager:
    """Begins migrations and re-attaches, and advances them from answers, reports, deadlines."""

    def __init__(self, config: MgmtConfig, lifecycle: VmLifecycleManager) -> None:
        self._config = config
        self.lifecycle = lifecycle

    # -- planning ------------------------------------------------------------------

    def _prepare(self, session: Session, ref: str, destination: str | None
                 ) -> tuple[VmInstance, Host, list[planner.Candidate], list[HeldDevice]]:
        vm = find_vm(session, ref)
        if vm.state != "Running" or vm.host_id is None:
            raise Conflict(f"VM {vm.name} is {vm.state}; only a Running VM migrates (wait for "
                           "its current job: hostdev job list)")
        source = session.get(Host, vm.host_id)
        assert source is not None
        offering = session.get(ServiceOffering, vm.offering_id)
        assert offering is not None
        held = [d for d in pci_devices.devices_of_vm(session.connection(), vm.id)
                if d.host_id == source.id]
        check_policy(vm.name, offering.name, offering.migration_policy, _named(held))
        demand = planner.Demand(cpus=vm.cpus, memory_mb=vm.memory_mb,
                                pci=offering_requests(session, vm.offering_id))
        names = [r.name for r in demand.pci]
        if destination is not None:
            host = find_host(session, destination)
            if host.id == source.id:
                raise InvalidRequest(f"VM {vm.name} already runs on {host.name}; name another "
                                     "host with --to, or leave it out to let placement choose")
            capacity = [h for h in planner.read_capacities(session, names) if h.id == host.id]
            verdict = planner.verdict(capacity[0], demand) if capacity else None
            if verdict is None or not verdict.accepted:
                reason = verdict.reason if verdict else "is not registered"
                raise NoCapacity(f"cannot migrate VM {vm.name} to {host.name}: {reason}")
            candidates = [planner.Candidate(id=host.id, guid=host.guid, name=host.name)]
        else:
            candidates = planner.find_hosts(session, demand, avoid={source.guid})
            if not candidates:
                hosts = planner.read_capacities(session, names)
                raise NoCapacity(f"cannot migrate VM {vm.name}: "
                                 + planner.refusal(demand, hosts, {source.guid}))
        return vm, source, candidates, held

    def plan(self, session: Session, ref: str, destination: str | None) -> MigrationPlan:
        """Says where a VM would go and which device replaces which; changes nothing."""
        vm, source, candidates, held = self._prepare(session, ref, destination)
        target = candidates[0]
        free = session.execute(
            select(PciDevice.name, PciDevice.domain, PciDevice.bus, PciDevice.slot,
                   PciDevice.function).where(PciDevice.host_id == target.id,
                                             PciDevice.state == "free")
            .order_by(PciDevice.id))
        spare = [NamedDevice(r.name, PciAddress(f"{r.domain}:{r.bus}:{r.slot}.{r.function}"))
                 for r in free]
        return MigrationPlan(vm_uuid=vm.uuid, source_guid=source.guid,
                             destination_guid=target.guid,
                             devices=pair_devices(_named(held), spare),
                             details=f"{vm.name}: {source.name} -> {target.name}")

    # -- beginning -----------------------------------------------------------------

    def begin(self, session: Session, ref: str, destination: str | None) -> Job:
        """Reserves the destination set, moves the VM to Migrating, sends MigrateCommand."""
        with session.no_autoflush:
            vm, source, candidates, held = self._prepare(session, ref, destination)
            requests = {r.name: r.count for r in offering_requests(session, vm.offering_id)}
            conn = session.connection()
            for candidate in candidates:
                target = session.get(Host, candidate.id)
                assert target is not None
                if not target.migration_uri:
                    log.info("migration_host_skipped", host=target.guid,
                             reason="announced no migration URI")
                    continue
                try:
                    reserved = pci_devices.reserve_devices(conn, vm.id, target.id, requests)
                except InsufficientDevices as exc:
                    log.info("migration_host_refused", vm=vm.uuid, host=target.guid,
                             reason=str(exc))
                    continue
                except ClaimRaceLost:
                    if any(d.host_id == target.id
                           for d in pci_devices.devices_of_vm(conn, vm.id)):
                        raise  # part of a reservation was written: a new transaction
                    continue
                return self._start(session, vm, source, target, held, reserved)
        raise NoCapacity(f"cannot migrate VM {vm.name}: every possible destination was taken "
                         "meanwhile or announced no migration URI; try again")

    def _start(self, session: Session, vm: VmInstance, source: Host, target: Host,
               held: list[HeldDevice], reserved: Sequence[HeldDevice]) -> Job:
        self.lifecycle.transition(session, vm, VmEvent.MIGRATION_REQUESTED)
        detach_s = 10.0
        budget = self._config.job_migrate_timeout_s
        command = MigrateCommand(vm_uuid=vm.uuid, destination_guid=target.guid,
                                 destination_uri=target.migration_uri,
                                 detach_timeout_s=detach_s,
                                 migrate_timeout_s=max(1.0, budget * 0.75
                                                       - detach_s * len(held)))
        command_id = outbox.send(session, f"agent.{source.guid}.MigrateCommand", command)
        mapping = pair_devices(_named(held), _named(reserved))
        payload: dict[str, Any] = {
            "source": source.guid, "source_id": source.id, "source_name": source.name,
            "destination": target.guid, "destination_id": target.id,
            "destination_name": target.name, "command_id": command_id,
            "mapping": [[m.name, str(m.source), str(m.destination)] for m in mapping]}
        request_id = session.info.get(REQUEST_KEY)
        if request_id:
            payload["request"] = request_id
        job = Job(kind=MIGRATE_JOB, state="running", vm_id=vm.id, step=STEP_MIGRATE,
                  payload=json.dumps(payload), details="",
                  deadline=utcnow() + timedelta(seconds=budget))
        session.add(job)
        session.flush()
        log.info("migration_started", job=job.id, vm=vm.uuid, source=source.guid,
                 destination=target.guid, devices=len(held))
        return job

    def attach_devices(self, session: Session, ref: str) -> Job:
        """Sends AttachPciDevicesCommand for every device a Running VM holds on its host."""
        vm = find_vm(session, ref)
        if vm.state != "Running" or vm.host_id is None:
            raise Conflict(f"VM {vm.name} is {vm.state}; devices are re-attached only to a "
                           "Running VM")
        addresses = self.held_on(session, vm, vm.host_id)
        if not addresses:
            raise Conflict(f"VM {vm.name} holds no PCI device on its host; nothing to attach")
        guid = host_guid_of(session, vm.host_id)
        payload: dict[str, Any] = {"host": guid}
        request_id = session.info.get(REQUEST_KEY)
        if request_id:
            payload["request"] = request_id
        job = Job(kind=ATTACH_JOB, state="running", vm_id=vm.id, step=STEP_ATTACH,
                  payload="{}", details="")
        self._send_attach(session, job, payload, vm, guid, addresses)
        session.add(job)
        session.flush()
        return job

    def held_on(self, session: Session, vm: VmInstance, host_id: int) -> tuple[PciAddress, ...]:
        """Returns the addresses of the devices ``vm`` holds (not merely reserves) on a host."""
        return tuple(sorted((d.address for d in pci_devices.devices_of_vm(session.connection(),
                                                                          vm.id)
                             if d.host_id == host_id and d.state in ("allocated", "quarantined")),
                            key=str))

    def _send_attach(self, session: Session, job: Job, payload: dict[str, Any],
                     vm: VmInstance, guid: str, addresses: Sequence[PciAddress]) -> None:
        timeout = self._config.job_attach_timeout_s
        per_device = max(1.0, timeout / (2 * max(1, len(addresses))))
        attach_id = outbox.send(session, f"agent.{guid}.AttachPciDevicesCommand",
                                AttachPciDevicesCommand(vm_uuid=vm.uuid,
                                                        addresses=tuple(addresses),
                                                        timeout_s=min(10.0, per_device)))
        payload.update(attach_id=attach_id, attach_host=guid,
                       attach=[str(a) for a in addresses])
        job.payload = json.dumps(payload)
        job.deadline = utcnow() + timedelta(seconds=timeout)

    # -- answers -------------------------------------------------------------------

    def _job_for(self, session: Session, vm_uuid: str, key: str, correlation_id: str | None
                 ) -> tuple[Job | None, VmInstance | None]:
        vm = session.scalar(select(VmInstance).where(VmInstance.uuid == vm_uuid))
        if vm is None or not correlation_id:
            return None, vm
        for job in session.scalars(select(Job).where(Job.vm_id == vm.id,
                                                     Job.state == "running")
                                   .with_for_update()):
            if _payload(job).get(key) == correlation_id:
                return job, vm
        log.info("migration_answer_without_job", vm=vm_uuid, correlation_id=correlation_id)
        return None, vm

    def on_migrate_answer(self, session: Session, answer: MigrateAnswer,
                          correlation_id: str | None) -> Job | None:
        """Advances a migration from the source's answer; a stale answer changes nothing."""
        job, vm = self._job_for(session, answer.vm_uuid, "command_id", correlation_id)
        if job is None or vm is None or job.step not in (STEP_MIGRATE, STEP_VERIFY):
            return None
        if answer.ok:
            self.migrated(session, job, vm, "the source agent reported the migration done")
            return job
        missing = missing_after_rollback(answer.detached, answer.reattached)
        step = answer.failed_step or STEP_MIGRATE
        self.roll_back(session, job, vm, step, answer.details, missing)
        return job

    def on_attach_answer(self, session: Session, answer: AttachPciDevicesAnswer,
                         correlation_id: str | None) -> Job | None:
        """Ends a migration's attach (or re-attach) step, or an attach-devices job."""
        job, vm = self._job_for(session, answer.vm_uuid, "attach_id", correlation_id)
        if job is None or vm is None:
            return None
        payload = _payload(job)
        addresses = [PciAddress(a) for a in payload.get("attach", [])]
        failed = failed_attaches(addresses, answer.devices, answer.ok)
        host_name = payload.get("destination_name") or payload.get("attach_host")
        if job.kind == MIGRATE_JOB and job.step == STEP_ATTACH:
            self.lifecycle.transition(session, vm, VmEvent.OPERATION_SUCCEEDED)
            done = (f"migrated VM {vm.name} from {payload['source_name']} to "
                    f"{payload['destination_name']}")
            if failed:
                self.finish(session, job, "failed", STEP_ATTACH, self.missing_text(
                    vm, done + ", but", host_name, failed))
            else:
                self.finish(session, job, "succeeded", "done",
                             f"{done} with {len(addresses)} PCI device(s) attached")
        elif job.kind == MIGRATE_JOB and job.step == STEP_REATTACH:
            note = payload.get("failure", "the migration failed")
            if failed:
                note = self.missing_text(vm, note + "; and", host_name, failed)
            else:
                note += f"; devices re-attached on {payload['source_name']}"
            self.finish(session, job, "failed", payload.get("failed_step", STEP_MIGRATE), note)
        elif job.kind == ATTACH_JOB:
            if failed:
                self.finish(session, job, "failed", STEP_ATTACH,
                             self.missing_text(vm, "still", host_name, failed))
            else:
                self.finish(session, job, "succeeded", "done",
                             f"{len(addresses)} PCI device(s) attached to VM {vm.name}")
        else:
            return None
        return job

    @staticmethod
    def missing_text(vm: VmInstance, lead: str, host: object,
                      failed: Sequence[tuple[PciAddress, str]]) -> str:
        return (f"{lead} devices not attached on {host}: {describe_missing(failed)}; they stay "
                f"held for VM {vm.name}: fix the cause, then retry with "
                f"`hostdev vm attach-devices {vm.name}`")

    # -- outcomes ------------------------------------------------------------------

    def migrated(self, session: Session, job: Job, vm: VmInstance, how: str) -> None:
        payload = _payload(job)
        source_id, target_id = int(payload["source_id"]), int(payload["destination_id"])
        conn = session.connection()
        before = pci_devices.devices_of_vm(conn, vm.id)
        pci_devices.commit_migration(conn, vm.id, source_id, target_id)
        session.execute(update(VmInstance).where(VmInstance.id == vm.id,
                                                 VmInstance.update_count == vm.update_count)
                        .values(host_id=target_id, last_host_id=source_id,
                                update_count=vm.update_count + 1, updated_at=utcnow())
                        .execution_options(synchronize_session=False))
        session.refresh(vm)
        at = utcnow().isoformat() + "Z"
        for device in before:
            guid = host_guid_of(session, device.host_id)
            event: PciDeviceReleased | PciDeviceAllocated
            if device.host_id == source_id:
                event = PciDeviceReleased(host_guid=guid, address=device.address,
                                          name=device.name, vm_uuid=vm.uuid, at=at)
                outbox.add(session, f"pci.{guid}.Released", event)
            elif device.host_id == target_id:
                event = PciDeviceAllocated(host_guid=guid, address=device.address,
                                           name=device.name, vm_uuid=vm.uuid, at=at)
                outbox.add(session, f"pci.{guid}.Allocated", event)
        log.info("migration_committed", job=job.id, vm=vm.uuid, how=how,
                 destination=payload["destination"])
        addresses = self.held_on(session, vm, target_id)
        job.step = STEP_ATTACH
        if not addresses:
            job.payload = json.dumps(payload)
            self.lifecycle.transition(session, vm, VmEvent.OPERATION_SUCCEEDED)
            self.finish(session, job, "succeeded", "done",
                         f"migrated VM {vm.name} from {payload['source_name']} to "
                         f"{payload['destination_name']}")
            return
        self._send_attach(session, job, payload, vm, payload["destination"], addresses)

    def roll_back(self, session: Session, job: Job, vm: VmInstance, step: str, reason: str,
                   missing: Sequence[PciAddress]) -> None:
        payload = _payload(job)
        freed = pci_devices.abort_migration(session.connection(), vm.id,
                                            int(payload["destination_id"]))
        self.lifecycle.transition(session, vm, VmEvent.OPERATION_FAILED)
        text = (f"migration of VM {vm.name} to {payload['destination_name']} failed at step "
                f"{step}: {reason}; {freed} reserved device(s) on "
                f"{payload['destination_name']} freed; the VM runs on "
                f"{payload['source_name']} with its devices")
        log.warning("migration_rolled_back", job=job.id, vm=vm.uuid, step=step, reason=reason,
                    missing=[str(a) for a in missing])
        if missing:
            payload.update(failure=text, failed_step=step)
            job.step = STEP_REATTACH
            self._send_attach(session, job, payload, vm, payload["source"], missing)
            return
        self.finish(session, job, "failed", step, text)

    # -- host reports and deadlines (hostdev.mgmt.jobs.migration_recovery) ---------------

    def on_host_report(self, session: Session, guid: str, domains: Sequence[DomainInfo], *,
                       complete: bool, restarted: bool = False) -> None:
        """Settles migrations from a host's report (see ``migration_recovery``)."""
        migration_recovery.on_host_report(self, session, guid, domains, complete=complete,
                                          restarted=restarted)

    def expire(self, session: Session, job: Job) -> bool:
        """Handles an overdue migrate or attach-devices job (see ``migration_recovery``)."""
        return migration_recovery.expire(self, session, job)

    # -- internals -------------------------------------------------------------------

    def finish(self, session: Session, job: Job, state: str, step: str, details: str) -> None:
        job.state = state
        job.details = details
        job.step = step
        job.deadline = None
        job.finished_at = utcnow()
        vm = session.get(VmInstance, job.vm_id) if job.vm_id is not None else None
        outcome = "Succeeded" if state == "succeeded" else "Failed"
        outbox.add(session, f"job.{job.id}.{outcome}",
                   JobFinished(job_id=job.id, job_kind=job.kind, state=state,  # type: ignore[arg-type]
                               vm_uuid=vm.uuid if vm else None, step=step, details=details,
                               at=utcnow().isoformat() + "Z"))
        metrics.job_finished(session, job)
        log.info("job_finished", job=job.id, kind=job.kind, state=state, step=step,
                 details=details)
