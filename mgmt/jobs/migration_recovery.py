"""How migrations settle when answers are lost: host reports and deadlines.

Management never guesses where a VM is. A migrate job without an answer by
its deadline moves to ``verify`` and stays in flight, holding both device
sets; start-ups, pings and lifecycle reports of its source and destination
then settle it: the destination runs the domain (commit and attach), the
source still runs it after a restart or the deadline (roll back, re-attach
what the domain lacks), or both list their domains without it (the VM is
Error and its devices are released). An attach without an answer fails the
job naming the devices, which stay held for the VM.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import structlog
from sqlalchemy import bindparam, select

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DomainInfo
from hostdev.mgmt.jobs import engine
from hostdev.mgmt.jobs.migration import MigrationManager
from hostdev.mgmt.jobs.migration_plan import STEP_ATTACH, STEP_MIGRATE, STEP_REATTACH, STEP_VERIFY
from hostdev.mgmt.jobs.payloads import (
    ATTACH_JOB,
    AttachPayload,
    MigratePayload,
    load,
    migrations_of,
    store,
)
from hostdev.mgmt.persistence.database import PreparedStatement
from hostdev.mgmt.persistence.models import Job, VmInstance, utcnow
from hostdev.mgmt.persistence.unit_of_work import TxContext
from hostdev.mgmt.vms.vm_states import VmEvent

log = structlog.get_logger()

#: How long a job in ``verify`` waits before it says so again (it stays in flight).
VERIFY_WINDOW_S = 30.0


#: Whether a VM of that uuid is migrating (one index lookup, no job scan).
_MIGRATING = PreparedStatement(select(VmInstance.id).where(
    VmInstance.uuid == bindparam("uuid"), VmInstance.state == "Migrating"))


def _any_migrating(tx: TxContext, domains: Sequence[DomainInfo]) -> bool:
    return any(_MIGRATING.execute(tx.connection, {"uuid": d.uuid}).rows for d in domains)


class MigrationRecovery:
    """Settles migrations from host reports and deadlines, through a ``MigrationManager``."""

    def __init__(self, manager: MigrationManager) -> None:
        self._manager = manager

    def on_host_report(self, tx: TxContext, guid: str, domains: Sequence[DomainInfo], *,
                       complete: bool, restarted: bool = False) -> None:
        """Settles migrations from where a host says the domains are.

        Args:
            tx: the transaction of the report's handler.
            guid: the reporting host.
            domains: what it reports (all its domains when ``complete``).
            complete: the report lists every domain (start-up, ping).
            restarted: the agent (re)started, so any command it was running is lost.
        """
        if not complete and not _any_migrating(tx, domains):
            # A lifecycle report (one domain, at every VM start and stop): only a
            # migration of that very VM could settle, and it is Migrating then.
            return
        manager = self._manager
        session = tx.session
        # Read without locks (this runs for every ping), then lock only the jobs
        # this host takes part in, and look at them again once locked.
        for job_id, _, step in migrations_of(session, guid):
            if step not in (STEP_MIGRATE, STEP_VERIFY):
                continue
            job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
            if job is None or job.state != "running" \
                    or job.step not in (STEP_MIGRATE, STEP_VERIFY):
                continue
            payload = load(job, MigratePayload)
            vm = session.get(VmInstance, job.vm_id) if job.vm_id is not None else None
            if vm is None or vm.state != "Migrating":
                continue
            found = next((d for d in domains if d.uuid == vm.uuid), None)
            if guid == payload.destination:
                if found is not None and found.state == "running":
                    manager.migrated(tx, job, vm, "the destination reported the domain running")
                elif complete and job.step == STEP_VERIFY:
                    self._absent(tx, job, vm, payload, "destination")
            elif restarted or job.step == STEP_VERIFY:
                if found is not None and found.state in ("running", "paused"):
                    held = manager.held_on(tx, vm, payload.source_id)
                    missing = tuple(a for a in held if a not in found.hostdevs)
                    manager.roll_back(tx, job, vm, STEP_MIGRATE,
                                      "the source agent lost the migration (it restarted or "
                                      "never answered) and the domain is still on the source",
                                      missing)
                elif complete:
                    self._absent(tx, job, vm, payload, "source")

    def _absent(self, tx: TxContext, job: Job, vm: VmInstance, payload: MigratePayload,
                side: str) -> None:
        absent = set(payload.absent_on)
        absent.add(side)
        payload.absent_on = sorted(absent)
        if job.step != STEP_VERIFY:
            job.step = STEP_VERIFY
            job.deadline = utcnow() + timedelta(seconds=VERIFY_WINDOW_S)
        store(job, payload)
        if absent == {"source", "destination"}:
            # Found on neither host: no domain holds any device; let them all go.
            self._manager.lifecycle.transition(tx, vm, VmEvent.ERROR_OCCURRED)
            engine.finish(tx, job, "failed",
                          f"VM {vm.name} is on neither {payload.source_name} nor "
                          f"{payload.destination_name} after its migration; it is Error "
                          "and its devices are released: start it again "
                          f"(`hostdev vm start {vm.name}`)", step=STEP_VERIFY)

    def expire(self, tx: TxContext, job: Job) -> bool:
        """Handles an overdue migrate or attach-devices job (locked by the caller)."""
        manager = self._manager
        vm = tx.session.get(VmInstance, job.vm_id) if job.vm_id is not None else None
        if vm is None:
            engine.finish(tx, job, "failed", "the VM is gone", step=job.step)
            return True
        if job.kind == ATTACH_JOB:
            attach = load(job, AttachPayload)
            host = attach.attach_host or "?"
            failed = [(PciAddress(a), f"no answer from host {host}") for a in attach.attach]
            engine.finish(tx, job, "failed", manager.missing_text(vm, "timed out;", host, failed),
                          step=job.step)
            log.warning("job_timed_out", job=job.id, kind=job.kind, host=host)
            return True
        payload = load(job, MigratePayload)
        if job.step in (STEP_MIGRATE, STEP_VERIFY):
            # Never guess: both sets stay held until a host says where the domain is.
            job.step = STEP_VERIFY
            job.deadline = utcnow() + timedelta(seconds=VERIFY_WINDOW_S)
            job.details = (f"no answer from {payload.source_name} to MigrateCommand; "
                           f"waiting for {payload.source_name} or "
                           f"{payload.destination_name} to report where VM {vm.name} "
                           "runs (both device sets stay held meanwhile)")
            log.warning("migration_outcome_unknown", job=job.id, vm=vm.uuid)
            return True
        host = payload.source_name if job.step == STEP_REATTACH else payload.destination_name
        failed = [(PciAddress(a), f"no answer from host {host}") for a in payload.attach]
        if job.step == STEP_ATTACH and vm.state == "Migrating":
            manager.lifecycle.transition(tx, vm, VmEvent.OPERATION_SUCCEEDED)
            engine.finish(tx, job, "failed", manager.missing_text(
                vm, f"migrated VM {vm.name} to {payload.destination_name}, but", host,
                failed), step=STEP_ATTACH)
        else:
            engine.finish(tx, job, "failed", manager.missing_text(
                vm, payload.failure or "timed out;", host, failed), step=job.step)
        log.warning("job_timed_out", job=job.id, kind=job.kind, host=host)
        return True
