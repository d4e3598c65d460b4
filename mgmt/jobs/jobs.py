"""Deploy, start, stop and destroy as persistent jobs advanced by the agents' answers.

A job is a row (``jobs``) changed in the same transaction as the VM and its
devices; the command to the agent goes through the outbox, so it leaves
exactly when that transaction committed. Its message id is kept in the job's
payload and the agent's answer carries it as ``correlation_id``: any
management daemon, not only the one that began the job, can advance it. A
job whose answer does not come before its deadline is failed and rolled back
by the sweeper (``expire``): devices released, VM state consistent, and a
forced stop sent so no domain lingers.
"""

from __future__ import annotations

import json
import re
import uuid as uuid_module
from collections.abc import Collection
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from hostdev.messages.commands import StartAnswer, StartCommand, StopAnswer, StopCommand
from hostdev.messages.events import JobFinished
from hostdev.messages.values import JobRow, PciRequest, VmSpec
from hostdev.mgmt import metrics
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.devices import pci_devices
from hostdev.mgmt.devices.pci_devices import ClaimRaceLost, InsufficientDevices
from hostdev.mgmt.errors import Conflict, InvalidRequest, NoCapacity, NotFound
from hostdev.mgmt.persistence import outbox
from hostdev.mgmt.persistence.database import PreparedStatement, RetryTransaction
from hostdev.mgmt.persistence.models import (
    Host,
    Job,
    ServiceOffering,
    ServiceOfferingPciRequest,
    VmInstance,
    utcnow,
)
from hostdev.mgmt.persistence.unit_of_work import REQUEST_KEY
from hostdev.mgmt.placement import planner
from hostdev.mgmt.vms.vm_lifecycle import (
    REQUESTS_KEY,
    PciDeviceManager,
    VmLifecycleManager,
    offering_requests,
)
from hostdev.mgmt.vms.vm_states import VmEvent

log = structlog.get_logger()

#: A VM name as libvirt and people both take it.
VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
#: How many hosts a deploy or start tries after failed starts before giving up.
MAX_START_ATTEMPTS = 3


def find_host(session: Session, ref: str) -> Host:
    """Returns the host named or identified (guid) by ``ref``.

    Raises:
        NotFound: no host has that name or guid; the text lists the hosts.
    """
    host = session.scalar(select(Host).where((Host.guid == ref) | (Host.name == ref))
                          .order_by(Host.id).limit(1))
    if host is None:
        names = ", ".join(session.scalars(select(Host.name).order_by(Host.id))) or "none"
        raise NotFound(f"no host is named {ref!r} (nor has that guid); hosts: {names}")
    return host


def find_vm(session: Session, ref: str) -> VmInstance:
    """Returns the live VM named or identified by ``ref``.

    Raises:
        NotFound: no VM (other than a destroyed one) has that name or uuid.
    """
    vm = session.scalar(select(VmInstance).where(
        (VmInstance.uuid == ref) | (VmInstance.name == ref),
        VmInstance.state != "Destroyed").order_by(VmInstance.id.desc()).limit(1))
    if vm is None:
        raise NotFound(f"no VM is named {ref!r} (nor has that uuid); list them with: "
                       "hostdev vm list")
    return vm


def find_offering(session: Session, name: str) -> ServiceOffering:
    """Returns the offering called ``name``, or NotFound listing those that exist."""
    offering = session.scalar(select(ServiceOffering).where(ServiceOffering.name == name))
    if offering is None:
        names = ", ".join(session.scalars(select(ServiceOffering.name)
                                          .order_by(ServiceOffering.name))) or "none yet"
        raise NotFound(f"no offering is named {name!r}; offerings: {names}")
    return offering


def job_row(session: Session, job: Job) -> JobRow:
    """Returns a job as the API shows it."""
    vm_uuid = (session.scalar(select(VmInstance.uuid).where(VmInstance.id == job.vm_id))
               if job.vm_id is not None else None)
    return JobRow(id=job.id, kind=job.kind, state=job.state, vm_uuid=vm_uuid,  # type: ignore[arg-type]
                  step=job.step, details=job.details,
                  created_at=job.created_at.isoformat() + "Z",
                  finished_at=job.finished_at.isoformat() + "Z" if job.finished_at else None)


def job_of_request(session: Session, request_id: str) -> Job | None:
    """Returns the job a (redelivered) API request created, if any."""
    return session.scalar(select(Job).where(
        Job.payload.contains(json.dumps({"request": request_id})[1:-1]))
        .order_by(Job.id.desc()).limit(1))


_OFFERING = ServiceOffering.__table__.c
_REQUEST = ServiceOfferingPciRequest.__table__.c
#: One round trip for a deploy: the offering, its PCI requests and a live VM of the name.
_FOR_DEPLOY = PreparedStatement(
    select(_OFFERING.id, _OFFERING.cpus, _OFFERING.memory_mb, _REQUEST.name, _REQUEST.count,
           select(VmInstance.uuid)
           .where(VmInstance.name == bindparam("vm_name"), VmInstance.state != "Destroyed")
           .limit(1).scalar_subquery())
    .select_from(ServiceOffering.__table__.outerjoin(
        ServiceOfferingPciRequest.__table__, _REQUEST.offering_id == _OFFERING.id))
    .where(_OFFERING.name == bindparam("offering"))
    .order_by(_REQUEST.id))


def _read_for_deploy(session: Session, offering_name: str,
                     vm_name: str) -> tuple[int, int, int, str | None]:
    """Returns an offering's id, CPUs and memory and a live VM called ``vm_name``, if any.

    Fills the transaction's cache of the offering's PCI requests on the way.

    Raises:
        NotFound: the offering does not exist; the text lists those that exist.
    """
    rows = _FOR_DEPLOY.execute(session.connection(),
                               {"offering": offering_name, "vm_name": vm_name}).rows
    if not rows:
        find_offering(session, offering_name)  # raises NotFound, listing the offerings
    offering_id, cpus, memory_mb, _, _, taken = rows[0]
    requests = tuple(PciRequest(name=name, count=int(count))
                     for _, _, _, name, count, _ in rows if name is not None)
    cache: dict[int, tuple[PciRequest, ...]] = session.info.setdefault(REQUESTS_KEY, {})
    cache[offering_id] = requests
    return offering_id, cpus, memory_mb, taken


def _payload(job: Job) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(job.payload or "{}")
    return data


class JobManager:
    """Begins jobs from API requests and advances them from agent answers and deadlines."""

    def __init__(self, config: MgmtConfig, lifecycle: VmLifecycleManager,
                 devices: PciDeviceManager) -> None:
        self._config = config
        self._lifecycle = lifecycle
        self._devices = devices

    # -- beginning ---------------------------------------------------------------

    def deploy(self, session: Session, name: str, offering_name: str,
               avoid: Collection[str] = ()) -> tuple[Job, VmInstance]:
        """Creates a VM from an offering, places it and sends StartCommand (one transaction).

        Raises:
            NotFound: the offering does not exist.
            Conflict: a live VM already has that name.
            NoCapacity: no host fits; nothing is created and the text says why.
        """
        if not VM_NAME.match(name):
            raise InvalidRequest(f"VM name {name!r} is not valid: use 1 to 64 letters, digits, "
                                 "'_', '.' or '-', starting with a letter or digit")
        offering_id, cpus, memory_mb, taken = _read_for_deploy(session, offering_name, name)
        if taken:
            raise Conflict(f"a VM named {name!r} exists already ({taken}); pick another name "
                           "or destroy it first")
        vm = VmInstance(uuid=str(uuid_module.uuid4()), name=name, offering_id=offering_id,
                        state="Stopped", update_count=0, cpus=cpus, memory_mb=memory_mb)
        session.add(vm)
        session.flush()
        job = self._new_job(session, "deploy", vm, {"avoid": list(avoid), "tried": []})
        self._place_and_start(session, job, vm)
        session.flush()  # one INSERT of the job, placed; gives its id
        return job, vm

    def start(self, session: Session, ref: str) -> Job:
        """Places a stopped VM and sends StartCommand."""
        vm = find_vm(session, ref)
        if vm.state not in ("Stopped", "Error"):
            raise Conflict(f"VM {vm.name} is {vm.state}; only a Stopped VM can be started")
        job = self._new_job(session, "start", vm, {"avoid": [], "tried": []})
        self._place_and_start(session, job, vm)
        session.flush()
        return job

    def stop(self, session: Session, ref: str, *, force: bool = False) -> Job:
        """Moves a running VM to Stopping and sends StopCommand to its host."""
        vm = find_vm(session, ref)
        if vm.state != "Running":
            raise Conflict(f"VM {vm.name} is {vm.state}; only a Running VM can be stopped")
        job = self._new_job(session, "stop", vm, {})
        self._send_stop(session, job, vm, force=force, undefine=False)
        session.flush()
        return job

    def destroy(self, session: Session, ref: str) -> Job:
        """Destroys a VM: a running one is stopped first; its devices are released."""
        vm = find_vm(session, ref)
        job = self._new_job(session, "destroy", vm, {})
        if vm.state == "Running":
            self._send_stop(session, job, vm, force=True, undefine=True)
        elif vm.state in ("Stopped", "Error"):
            host_id = vm.host_id or vm.last_host_id
            self._lifecycle.transition(session, vm, VmEvent.DESTROY_REQUESTED)
            if host_id is not None:  # remove the domain's definition, best effort
                guid = session.scalar(select(Host.guid).where(Host.id == host_id))
                outbox.add(session, f"agent.{guid}.StopCommand",
                           StopCommand(vm_uuid=vm.uuid, force=True, undefine=True))
            self._finish(session, job, "succeeded", "destroyed")
        else:
            raise Conflict(f"VM {vm.name} is {vm.state}; wait until its current job "
                           "finishes (hostdev job show), then destroy it")
        session.flush()
        return job

    # -- answers ---------------------------------------------------------------

    def on_start_answer(self, session: Session, answer: StartAnswer,
                        correlation_id: str | None) -> Job | None:
        """Advances the start of a VM; a failed start tries the next host."""
        job, vm = self._job_for(session, answer.vm_uuid, correlation_id)
        if job is None or vm is None or vm.state != "Starting":
            return None
        if answer.ok:
            self._lifecycle.transition(session, vm, VmEvent.OPERATION_SUCCEEDED)
            payload = _payload(job)
            self._finish(session, job, "succeeded",
                         f"running on {payload.get('host_name') or payload.get('host')}")
            return job
        payload = _payload(job)
        log.warning("vm_start_failed", vm=vm.uuid, host=payload.get("host"),
                    details=answer.details)
        self._lifecycle.transition(session, vm, VmEvent.OPERATION_FAILED)
        payload.setdefault("failures", []).append(f"{payload.get('host')}: {answer.details}")
        job.payload = json.dumps(payload)
        if len(payload["tried"]) >= MAX_START_ATTEMPTS:
            self._finish(session, job, "failed", "start failed on " +
                         "; ".join(payload["failures"]))
            return job
        try:
            self._place_and_start(session, job, vm)
        except NoCapacity as exc:
            self._finish(session, job, "failed", "start failed on " +
                         "; ".join(payload["failures"]) + f"; then {exc.reason}")
        return job

    def on_stop_answer(self, session: Session, answer: StopAnswer,
                       correlation_id: str | None) -> Job | None:
        """Finishes a stop or destroy: Stopped (or Destroyed) on success, Running on failure."""
        job, vm = self._job_for(session, answer.vm_uuid, correlation_id)
        if job is None or vm is None or vm.state != "Stopping":
            return None
        if answer.ok:
            event = (VmEvent.DESTROY_REQUESTED if job.kind == "destroy"
                     else VmEvent.OPERATION_SUCCEEDED)
            self._lifecycle.transition(session, vm, event)
            self._finish(session, job, "succeeded", "destroyed" if job.kind == "destroy"
                         else "stopped")
        else:
            self._lifecycle.transition(session, vm, VmEvent.OPERATION_FAILED)
            self._finish(session, job, "failed", f"the host refused to stop it: "
                         f"{answer.details}")
        return job

    # -- deadlines ---------------------------------------------------------------

    def overdue(self, session: Session, limit: int = 100) -> list[int]:
        """Returns the ids of running jobs past their deadline."""
        return list(session.scalars(
            select(Job.id).where(Job.state == "running", Job.deadline < utcnow())
            .order_by(Job.deadline).limit(limit)))

    def expire(self, session: Session, job_id: int) -> bool:
        """Fails one overdue job and rolls its VM back; False if it finished meanwhile."""
        job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None or job.state != "running" or job.deadline is None \
                or job.deadline >= utcnow():
            return False
        vm = session.get(VmInstance, job.vm_id) if job.vm_id is not None else None
        payload = _payload(job)
        host = payload.get("host", "?")
        waited = f"no answer from host {host} to {job.step} VM {vm.name if vm else '?'}"
        if vm is not None and vm.state == "Starting":
            guid = payload.get("host")
            self._lifecycle.transition(session, vm, VmEvent.OPERATION_FAILED)
            if guid:  # make sure a late start does not leave a domain holding devices
                outbox.add(session, f"agent.{guid}.StopCommand",
                           StopCommand(vm_uuid=vm.uuid, force=True,
                                       undefine=job.kind == "deploy"))
            self._finish(session, job, "failed", f"timed out: {waited}; rolled back, "
                         "devices released")
        elif vm is not None and vm.state == "Stopping":
            self._lifecycle.transition(session, vm, VmEvent.OPERATION_FAILED)
            self._finish(session, job, "failed", f"timed out: {waited}; the VM is "
                         "considered Running until its host reports otherwise")
        else:
            self._finish(session, job, "failed", f"timed out: {waited}")
        log.warning("job_timed_out", job=job.id, kind=job.kind, host=host)
        return True

    # -- internals ---------------------------------------------------------------

    def _new_job(self, session: Session, kind: str, vm: VmInstance,
                 payload: dict[str, Any]) -> Job:
        request_id = session.info.get(REQUEST_KEY)
        if request_id:  # lets a redelivered request find the job it created
            payload["request"] = request_id
        job = Job(kind=kind, state="running", vm_id=vm.id, step="place",
                  payload=json.dumps(payload), details="",
                  deadline=utcnow() + timedelta(seconds=self._config.job_start_timeout_s))
        session.add(job)
        return job

    def _place_and_start(self, session: Session, job: Job, vm: VmInstance) -> None:
        # A new job is inserted once, with its final step and payload, by the
        # caller's flush, not early by a query's autoflush.
        with session.no_autoflush:
            self._place(session, job, vm)

    def _place(self, session: Session, job: Job, vm: VmInstance) -> None:
        payload = _payload(job)
        demand = planner.Demand(cpus=vm.cpus, memory_mb=vm.memory_mb,
                                pci=offering_requests(session, vm.offering_id))
        avoid = set(payload.get("avoid", [])) | set(payload.get("tried", []))
        candidates = planner.find_hosts(session, demand, avoid=avoid)
        if not candidates:
            hosts = planner.read_capacities(session, [r.name for r in demand.pci])
            raise NoCapacity(planner.refusal(demand, hosts, avoid))
        for candidate in candidates:
            # The claim (a pre-transition listener) runs before the VM row
            # changes and refuses before writing anything: nothing to undo, try
            # the next host. A lost race that wrote part of a claim propagates
            # and the whole unit of work is retried in a new transaction.
            try:
                self._lifecycle.transition(session, vm, VmEvent.START_REQUESTED,
                                           host_id=candidate.id)
            except InsufficientDevices as exc:
                log.info("placement_host_refused", vm=vm.uuid, host=candidate.guid,
                         reason=str(exc))
                continue
            except ClaimRaceLost as exc:
                # Devices locked by another daemon's claim: if nothing of ours
                # was written, the next host is as good as a new transaction.
                if pci_devices.devices_of_vm(session.connection(), vm.id):
                    raise
                log.info("placement_race_lost", vm=vm.uuid, host=candidate.guid,
                         reason=str(exc))
                continue
            payload.setdefault("tried", []).append(candidate.guid)
            spec = VmSpec(uuid=vm.uuid, name=vm.name, cpus=vm.cpus, memory_mb=vm.memory_mb,
                          pci_devices=self._devices.held_addresses(session, vm.id))
            command_id = outbox.send(session, f"agent.{candidate.guid}.StartCommand",
                                    StartCommand(vm=spec))
            payload.update(host=candidate.guid, host_name=candidate.name, command_id=command_id)
            job.payload = json.dumps(payload)
            job.step = "start"
            job.deadline = utcnow() + timedelta(seconds=self._config.job_start_timeout_s)
            log.info("vm_placed", vm=vm.uuid, host=candidate.guid, job=job.id)
            return
        # Every candidate was taken under us: a new transaction sees the new counts.
        raise RetryTransaction(f"every host found for VM {vm.name} was taken meanwhile")

    def _send_stop(self, session: Session, job: Job, vm: VmInstance, *, force: bool,
                   undefine: bool) -> None:
        guid = session.scalar(select(Host.guid).where(Host.id == vm.host_id))
        self._lifecycle.transition(session, vm, VmEvent.STOP_REQUESTED)
        timeout = self._config.job_stop_timeout_s
        command_id = outbox.send(session, f"agent.{guid}.StopCommand",
                                StopCommand(vm_uuid=vm.uuid, force=force,
                                            timeout_s=max(1.0, timeout / 2),
                                            undefine=undefine))
        payload = _payload(job)
        payload.update(host=guid, command_id=command_id)
        job.payload = json.dumps(payload)
        job.step = "stop"
        job.deadline = utcnow() + timedelta(seconds=timeout)

    def _job_for(self, session: Session, vm_uuid: str,
                 correlation_id: str | None) -> tuple[Job | None, VmInstance | None]:
        vm = session.scalar(select(VmInstance).where(VmInstance.uuid == vm_uuid))
        if vm is None:
            log.warning("answer_for_unknown_vm", vm=vm_uuid, correlation_id=correlation_id)
            return None, None
        for job in session.scalars(select(Job).where(Job.vm_id == vm.id,
                                                     Job.state == "running")
                                   .with_for_update()):
            if correlation_id and _payload(job).get("command_id") == correlation_id:
                return job, vm
        log.info("answer_without_job", vm=vm_uuid, correlation_id=correlation_id)
        return None, vm

    def _finish(self, session: Session, job: Job, state: str, details: str) -> None:
        if job.id is None:
            session.flush()  # the routing key names the job
        job.state = state
        job.details = details
        job.step = "done"
        job.deadline = None
        job.finished_at = utcnow()
        vm = session.get(VmInstance, job.vm_id) if job.vm_id is not None else None
        vm_uuid = vm.uuid if vm is not None else None
        outcome = "Succeeded" if state == "succeeded" else "Failed"
        outbox.add(session, f"job.{job.id}.{outcome}",
                   JobFinished(job_id=job.id, job_kind=job.kind, state=state,  # type: ignore[arg-type]
                               vm_uuid=vm_uuid, step=job.step, details=details,
                               at=utcnow().isoformat() + "Z"))
        log.info("job_finished", job=job.id, kind=job.kind, state=state, details=details)
        metrics.job_finished(session, job)  # hostdev_job_duration_seconds, at commit
