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

import json
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DomainInfo
from hostdev.mgmt.jobs.migration_plan import (
    MIGRATE_JOB,
    STEP_ATTACH,
    STEP_MIGRATE,
    STEP_REATTACH,
    STEP_VERIFY,
)
from hostdev.mgmt.persistence.models import Job, VmInstance, utcnow
from hostdev.mgmt.vms.vm_states import VmEvent

if TYPE_CHECKING:
    from hostdev.mgmt.jobs.migration import MigrationManager

log = structlog.get_logger()

#: How long a job in ``verify`` waits before it says so again (it stays in flight).
VERIFY_WINDOW_S = 30.0


def _payload(job: Job) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(job.payload or "{}")
    return data


def on_host_report(manager: MigrationManager, session: Session, guid: str,
                   domains: Sequence[DomainInfo], *, complete: bool,
                   restarted: bool = False) -> None:
    """Settles migrations from where a host says the domains are.

    Args:
        manager: the migration manager whose outcomes this applies.
        session: the transaction of the report's handler.
        guid: the reporting host.
        domains: what it reports (all its domains when ``complete``).
        complete: the report lists every domain (start-up, ping).
        restarted: the agent (re)started, so any command it was running is lost.
    """
    # Read without locks (this runs for every ping), then lock only the jobs
    # this host takes part in, and look at them again once locked.
    candidates = session.execute(select(Job.id, Job.payload).where(
        Job.kind == MIGRATE_JOB, Job.state == "running",
        Job.step.in_((STEP_MIGRATE, STEP_VERIFY)))).all()
    for job_id, raw in candidates:
        if guid not in json.loads(raw or "{}").values():
            continue
        job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None or job.state != "running" \
                or job.step not in (STEP_MIGRATE, STEP_VERIFY):
            continue
        payload = _payload(job)
        vm = session.get(VmInstance, job.vm_id) if job.vm_id is not None else None
        if vm is None or vm.state != "Migrating":
            continue
        found = next((d for d in domains if d.uuid == vm.uuid), None)
        if guid == payload["destination"]:
            if found is not None and found.state == "running":
                manager.migrated(session, job, vm,
                                 "the destination reported the domain running")
            elif complete and job.step == STEP_VERIFY:
                _absent(manager, session, job, vm, payload, "destination")
        elif restarted or job.step == STEP_VERIFY:
            if found is not None and found.state in ("running", "paused"):
                held = manager.held_on(session, vm, int(payload["source_id"]))
                missing = tuple(a for a in held if a not in found.hostdevs)
                manager.roll_back(session, job, vm, STEP_MIGRATE,
                                  "the source agent lost the migration (it restarted or "
                                  "never answered) and the domain is still on the source",
                                  missing)
            elif complete:
                _absent(manager, session, job, vm, payload, "source")


def _absent(manager: MigrationManager, session: Session, job: Job, vm: VmInstance,
            payload: dict[str, Any], side: str) -> None:
    absent = set(payload.get("absent_on", []))
    absent.add(side)
    payload["absent_on"] = sorted(absent)
    if job.step != STEP_VERIFY:
        job.step = STEP_VERIFY
        job.deadline = utcnow() + timedelta(seconds=VERIFY_WINDOW_S)
    job.payload = json.dumps(payload)
    if absent == {"source", "destination"}:
        # Found on neither host: no domain holds any device; let them all go.
        manager.lifecycle.transition(session, vm, VmEvent.ERROR_OCCURRED)
        manager.finish(session, job, "failed", STEP_VERIFY,
                       f"VM {vm.name} is on neither {payload['source_name']} nor "
                       f"{payload['destination_name']} after its migration; it is Error "
                       "and its devices are released: start it again "
                       f"(`hostdev vm start {vm.name}`)")


def expire(manager: MigrationManager, session: Session, job: Job) -> bool:
    """Handles an overdue migrate or attach-devices job (locked by the caller)."""
    vm = session.get(VmInstance, job.vm_id) if job.vm_id is not None else None
    payload = _payload(job)
    if vm is None:
        manager.finish(session, job, "failed", job.step, "the VM is gone")
        return True
    if job.kind == MIGRATE_JOB and job.step in (STEP_MIGRATE, STEP_VERIFY):
        # Never guess: both sets stay held until a host says where the domain is.
        job.step = STEP_VERIFY
        job.deadline = utcnow() + timedelta(seconds=VERIFY_WINDOW_S)
        job.details = (f"no answer from {payload['source_name']} to MigrateCommand; "
                       f"waiting for {payload['source_name']} or "
                       f"{payload['destination_name']} to report where VM {vm.name} "
                       "runs (both device sets stay held meanwhile)")
        log.warning("migration_outcome_unknown", job=job.id, vm=vm.uuid)
        return True
    host = payload.get("attach_host", "?")
    if job.kind == MIGRATE_JOB:
        host = payload["source_name" if job.step == STEP_REATTACH else "destination_name"]
    failed = [(PciAddress(a), f"no answer from host {host}") for a in payload.get("attach", [])]
    if job.kind == MIGRATE_JOB and job.step == STEP_ATTACH and vm.state == "Migrating":
        manager.lifecycle.transition(session, vm, VmEvent.OPERATION_SUCCEEDED)
        manager.finish(session, job, "failed", STEP_ATTACH, manager.missing_text(
            vm, f"migrated VM {vm.name} to {payload['destination_name']}, but", host,
            failed))
    else:
        manager.finish(session, job, "failed", job.step, manager.missing_text(
            vm, payload.get("failure", "timed out;"), host, failed))
    log.warning("job_timed_out", job=job.id, kind=job.kind, host=host)
    return True
