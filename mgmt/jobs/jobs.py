"""Deploy, start, stop and destroy as persistent jobs advanced by the agents' answers.

A job is a row (``jobs``) changed in the same transaction as the VM and its
devices; the command to the agent goes through the outbox, so it leaves
exactly when that transaction committed. Its message id is the job's
``command_id`` and the agent's answer carries it as ``correlation_id``: any
management daemon, not only the one that began the job, can advance it. A
job whose answer does not come before its deadline is failed and rolled back
(``expire``, dispatched by ``engine.Expiry``): devices released, VM state
consistent, and a forced stop sent so no domain lingers.
"""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Collection
from datetime import datetime, timedelta

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from hostdev.messages.commands import StartAnswer, StartCommand, StopAnswer, StopCommand
from hostdev.messages.values import JobRow, NumaPolicy, VmSpec
from hostdev.mgmt.api.offerings import describe_pci_requests
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.devices import pci_devices
from hostdev.mgmt.devices.pci_devices import ClaimRaceLost, InsufficientDevices
from hostdev.mgmt.errors import Conflict, NoCapacity, NotFound
from hostdev.mgmt.jobs import deploy_reads, engine
from hostdev.mgmt.jobs.payloads import (
    START_JOB,
    JobKind,
    StartPayload,
    StopPayload,
    load,
    store,
)
from hostdev.mgmt.persistence.core_insert import insert_object
from hostdev.mgmt.persistence.database import RetryTransaction
from hostdev.mgmt.persistence.models import (
    VM_DESTROYED,
    VM_STOPPED,
    Host,
    Job,
    ServiceOffering,
    VmInstance,
    utcnow,
)
from hostdev.mgmt.persistence.unit_of_work import TxContext
from hostdev.mgmt.placement import planner
from hostdev.mgmt.vms import templates
from hostdev.mgmt.vms.vm_lifecycle import (
    PciDeviceManager,
    VmLifecycleManager,
    host_guid_of,
    offering_numa_policy,
    offering_requests,
)
from hostdev.mgmt.vms.vm_states import VmEvent

log = structlog.get_logger()

#: How many hosts a deploy or start tries after failed starts before giving up.
MAX_START_ATTEMPTS = 3


def find_host(session: Session, ref: str) -> Host:
    """Returns the host identified (guid) or, failing that, named by ``ref``.

    A guid wins over a name: an agent chooses its own name, so another host
    could announce itself under a name already taken, and a name that two
    hosts carry is refused rather than resolved to either.

    Raises:
        NotFound: no host has that guid or name; the text lists the hosts.
        Conflict: several hosts carry that name; the text lists their guids.
    """
    host = session.scalar(select(Host).where(Host.guid == ref))
    if host is not None:
        return host
    named = session.scalars(select(Host).where(Host.name == ref).order_by(Host.id)).all()
    if len(named) == 1:
        return named[0]
    if named:
        guids = ", ".join(h.guid for h in named)
        raise Conflict(f"{len(named)} hosts are named {ref!r} (guids {guids}); "
                       "name the host by its guid")
    names = ", ".join(session.scalars(select(Host.name).order_by(Host.id))) or "none"
    raise NotFound(f"no host is named {ref!r} (nor has that guid); hosts: {names}")


def find_vm(session: Session, ref: str) -> VmInstance:
    """Returns the live VM named or identified by ``ref``.

    Raises:
        NotFound: no VM (other than a destroyed one) has that name or uuid.
    """
    vm = session.scalar(select(VmInstance).where(
        (VmInstance.uuid == ref) | (VmInstance.name == ref),
        VmInstance.state != VM_DESTROYED).order_by(VmInstance.id.desc()).limit(1))
    if vm is None:
        raise NotFound(f"no VM is named {ref!r} (nor has that uuid); list them with: "
                       "hostdev vm list")
    return vm


def find_offering(session: Session, name: str) -> ServiceOffering:
    """Returns the offering called ``name``, or NotFound listing those that exist."""
    offering = session.scalar(select(ServiceOffering).where(ServiceOffering.name == name))
    if offering is None:
        raise deploy_reads.no_such_offering(session, name)
    return offering


def job_row(session: Session, job: Job) -> JobRow:
    """Returns a job as the API shows it."""
    vm_uuid = (session.scalar(select(VmInstance.uuid).where(VmInstance.id == job.vm_id))
               if job.vm_id is not None else None)
    return JobRow(id=job.id, kind=job.kind, state=job.state, vm_uuid=vm_uuid,
                  step=job.step, details=job.details,
                  created_at=job.created_at.isoformat() + "Z",
                  finished_at=job.finished_at.isoformat() + "Z" if job.finished_at else None)


class JobManager:
    """Begins jobs from API requests and advances them from agent answers and deadlines."""

    def __init__(self, config: MgmtConfig, lifecycle: VmLifecycleManager,
                 devices: PciDeviceManager) -> None:
        self._config = config
        self._lifecycle = lifecycle
        self._devices = devices

    # -- beginning ---------------------------------------------------------------

    def deploy(self, tx: TxContext, name: str, offering_name: str,
               avoid: Collection[str] = ()) -> tuple[Job, VmInstance]:
        """Creates a VM from an offering, places it and sends StartCommand (one transaction).

        Raises:
            NotFound: the offering does not exist.
            Conflict: a live VM already has that name.
            NoCapacity: no host fits; nothing is created and the text says why.
        """
        offering_id, cpus, memory_mb, taken = deploy_reads.read_for_deploy(tx, offering_name,
                                                                           name)
        if taken:
            raise Conflict(f"a VM named {name!r} exists already ({taken}); pick another name "
                           "or destroy it first")
        # Core INSERTs, no session: the VM and its job, each written once (the
        # job placed, with its command), cost no ORM flush.
        vm = VmInstance(uuid=str(uuid_module.uuid4()), name=name, offering_id=offering_id,
                        state=VM_STOPPED, update_count=0, cpus=cpus, memory_mb=memory_mb)
        insert_object(tx.connection, vm)
        deploy_reads.created(tx, name, vm.uuid)
        job = engine.unsaved_job(tx, "deploy", vm, "place", StartPayload(avoid=list(avoid)),
                                 self._start_deadline())
        self._place(tx, job, vm)
        insert_object(tx.connection, job)
        return job, vm

    def start(self, tx: TxContext, ref: str) -> Job:
        """Places a stopped VM and sends StartCommand."""
        vm = find_vm(tx.session, ref)
        if vm.state not in ("Stopped", "Error"):
            raise Conflict(f"VM {vm.name} is {vm.state}; only a Stopped VM can be started")
        job = self._new_job(tx, START_JOB, vm, StartPayload())
        self._place_and_start(tx, job, vm)
        tx.session.flush()
        return job

    def stop(self, tx: TxContext, ref: str, *, force: bool = False) -> Job:
        """Moves a running VM to Stopping and sends StopCommand to its host."""
        vm = find_vm(tx.session, ref)
        if vm.state != "Running":
            raise Conflict(f"VM {vm.name} is {vm.state}; only a Running VM can be stopped")
        job = self._new_job(tx, "stop", vm, StopPayload())
        self._send_stop(tx, job, vm, force=force, undefine=False)
        tx.session.flush()
        return job

    def destroy(self, tx: TxContext, ref: str) -> Job:
        """Destroys a VM: a running one is stopped first; its devices are released."""
        vm = find_vm(tx.session, ref)
        job = self._new_job(tx, "destroy", vm, StopPayload())
        if vm.state == "Running":
            self._send_stop(tx, job, vm, force=True, undefine=True)
        elif vm.state in ("Stopped", "Error"):
            host_id = vm.host_id or vm.last_host_id
            self._lifecycle.transition(tx, vm, VmEvent.DESTROY_REQUESTED)
            if host_id is not None:  # remove the domain's definition, best effort
                guid = host_guid_of(tx, host_id)
                tx.outbox.add(f"agent.{guid}.StopCommand",
                              StopCommand(vm_uuid=vm.uuid, force=True, undefine=True))
            engine.finish(tx, job, "succeeded", "destroyed")
        else:
            raise Conflict(f"VM {vm.name} is {vm.state}; wait until its current job "
                           "finishes (hostdev job show), then destroy it")
        tx.session.flush()
        return job

    # -- answers ---------------------------------------------------------------

    def on_start_answer(self, tx: TxContext, answer: StartAnswer,
                        correlation_id: str | None, sender: str | None) -> Job | None:
        """Advances the start of a VM; a failed start tries the next host."""
        job, vm = engine.job_for_answer(tx, answer, correlation_id, sender)
        if job is None or vm is None or vm.state != "Starting":
            return None
        payload = load(job, StartPayload)
        if answer.ok:
            self._lifecycle.transition(tx, vm, VmEvent.OPERATION_SUCCEEDED)
            engine.finish(tx, job, "succeeded", f"running on {payload.host_name or payload.host}")
            return job
        log.warning("vm_start_failed", vm=vm.uuid, host=payload.host, details=answer.details)
        self._lifecycle.transition(tx, vm, VmEvent.OPERATION_FAILED)
        payload.failures.append(f"{payload.host}: {answer.details}")
        store(job, payload)
        if len(payload.tried) >= MAX_START_ATTEMPTS:
            engine.finish(tx, job, "failed", "start failed on " + "; ".join(payload.failures))
            return job
        try:
            self._place_and_start(tx, job, vm)
        except NoCapacity as exc:
            engine.finish(tx, job, "failed", "start failed on " +
                          "; ".join(payload.failures) + f"; then {exc.reason}")
        return job

    def on_stop_answer(self, tx: TxContext, answer: StopAnswer,
                       correlation_id: str | None, sender: str | None) -> Job | None:
        """Finishes a stop or destroy: Stopped (or Destroyed) on success, Running on failure."""
        job, vm = engine.job_for_answer(tx, answer, correlation_id, sender)
        if job is None or vm is None or vm.state != "Stopping":
            return None
        if answer.ok:
            event = (VmEvent.DESTROY_REQUESTED if job.kind == "destroy"
                     else VmEvent.OPERATION_SUCCEEDED)
            self._lifecycle.transition(tx, vm, event)
            engine.finish(tx, job, "succeeded", "destroyed" if job.kind == "destroy"
                          else "stopped")
        else:
            self._lifecycle.transition(tx, vm, VmEvent.OPERATION_FAILED)
            engine.finish(tx, job, "failed", f"the host refused to stop it: {answer.details}")
        return job

    # -- deadlines ---------------------------------------------------------------

    def expire(self, tx: TxContext, job: Job) -> bool:
        """Fails one overdue deploy, start, stop or destroy and rolls its VM back."""
        vm = tx.session.get(VmInstance, job.vm_id) if job.vm_id is not None else None
        payload = (load(job, StartPayload) if job.kind in ("deploy", START_JOB)
                   else load(job, StopPayload))
        host = payload.host or "?"
        waited = f"no answer from host {host} to {job.step} VM {vm.name if vm else '?'}"
        if vm is not None and vm.state == "Starting":
            self._lifecycle.transition(tx, vm, VmEvent.OPERATION_FAILED)
            if payload.host:  # make sure a late start does not leave a domain holding devices
                tx.outbox.add(f"agent.{payload.host}.StopCommand",
                              StopCommand(vm_uuid=vm.uuid, force=True,
                                          undefine=job.kind == "deploy"))
            engine.finish(tx, job, "failed", f"timed out: {waited}; rolled back, "
                          "devices released")
        elif vm is not None and vm.state == "Stopping":
            self._lifecycle.transition(tx, vm, VmEvent.OPERATION_FAILED)
            engine.finish(tx, job, "failed", f"timed out: {waited}; the VM is "
                          "considered Running until its host reports otherwise")
        else:
            engine.finish(tx, job, "failed", f"timed out: {waited}")
        log.warning("job_timed_out", job=job.id, kind=job.kind, host=host)
        return True

    # -- internals ---------------------------------------------------------------

    def _new_job(self, tx: TxContext, kind: JobKind, vm: VmInstance,
                 payload: StartPayload | StopPayload) -> Job:
        return engine.new_job(tx, kind, vm, "place", payload, self._start_deadline())

    def _start_deadline(self) -> datetime:
        """Returns when a job placed or started now times out (``job_start_timeout_s``)."""
        return utcnow() + timedelta(seconds=self._config.job_start_timeout_s)

    def _place_and_start(self, tx: TxContext, job: Job, vm: VmInstance) -> None:
        # A new job is inserted once, with its final step and payload, by the
        # caller's flush, not early by a query's autoflush.
        with tx.session.no_autoflush:
            self._place(tx, job, vm)

    def _place(self, tx: TxContext, job: Job, vm: VmInstance) -> None:
        """Places the VM on the first host that takes it and sends StartCommand there.

        Reads and writes through the connection: a session is opened only
        to refuse (no capacity) and to read a template.
        """
        payload = load(job, StartPayload)
        policy = offering_numa_policy(tx, vm.offering_id)
        demand = planner.Demand(cpus=vm.cpus, memory_mb=vm.memory_mb,
                                pci=offering_requests(tx, vm.offering_id), numa=policy)
        avoid = set(payload.avoid) | set(payload.tried)
        # Hosts whose device rules refuse the claim (final: their claims are
        # serialized and read whole), and whether any refusal was a lost race.
        refused: dict[str, str] = {}
        raced = False
        while True:
            candidates = planner.search_hosts(tx.connection, demand, avoid=avoid | set(refused))
            if not candidates:
                break
            for candidate in candidates:
                outcome = self._claim_on(tx, vm, candidate)
                if outcome is None:
                    self._send_start(tx, job, vm, payload, candidate, policy)
                    return
                if isinstance(outcome, InsufficientDevices) and outcome.by_rules:
                    refused[candidate.guid] = f"{candidate.name} {outcome.detail}"
                else:
                    raced = True
            if raced:
                # A host was taken under us: a new transaction sees the new counts.
                raise RetryTransaction(f"every host found for VM {vm.name} was taken meanwhile")
        if refused:
            raise NoCapacity(f"no host can give one VM {describe_pci_requests(demand.pci)}: "
                             + "; ".join(refused.values()))
        hosts = planner.read_capacities(tx.session, [r.name for r in demand.pci])
        raise NoCapacity(planner.refusal(demand, hosts, avoid))

    def _claim_on(self, tx: TxContext, vm: VmInstance, candidate: planner.Candidate,
                  ) -> Exception | None:
        """Moves the VM to Starting on ``candidate``, claiming its devices there.

        Returns None when it did, or why the host refused (nothing written).
        """
        tx.host_guids[candidate.id] = candidate.guid  # the claim's events name it
        # The claim (a pre-transition listener) runs before the VM row
        # changes and refuses before writing anything: nothing to undo, try
        # the next host. A lost race that wrote part of a claim propagates
        # and the whole unit of work is retried in a new transaction.
        try:
            self._lifecycle.transition(tx, vm, VmEvent.START_REQUESTED, host_id=candidate.id)
        except InsufficientDevices as exc:
            log.info("placement_host_refused", vm=vm.uuid, host=candidate.guid,
                     reason=str(exc))
            return exc
        except ClaimRaceLost as exc:
            # Devices locked by another daemon's claim: if nothing of ours
            # was written, the next host is as good as a new transaction.
            if pci_devices.devices_of_vm(tx.connection, vm.id):
                raise
            log.info("placement_race_lost", vm=vm.uuid, host=candidate.guid, reason=str(exc))
            return exc
        return None

    def _send_start(self, tx: TxContext, job: Job, vm: VmInstance, payload: StartPayload,
                    candidate: planner.Candidate, policy: NumaPolicy) -> None:
        """Sends StartCommand to the host the VM was just placed on; the job waits for it."""
        payload.tried.append(candidate.guid)
        # Only ``required`` binds the guest's memory to its devices' node.
        spec = VmSpec(uuid=vm.uuid, name=vm.name, cpus=vm.cpus, memory_mb=vm.memory_mb,
                      pci_devices=self._devices.held_addresses(tx, vm.id),
                      numa_node=vm.numa_node if policy == "required" else None)
        engine.send(tx, job, candidate.guid,
                    StartCommand(vm=spec, domain_xml=templates.domain_for(tx, vm, spec)))
        payload.host, payload.host_name = candidate.guid, candidate.name
        store(job, payload)
        job.step = "start"
        job.deadline = self._start_deadline()
        log.info("vm_placed", vm=vm.uuid, host=candidate.guid, job=job.id)

    def _send_stop(self, tx: TxContext, job: Job, vm: VmInstance, *, force: bool,
                   undefine: bool) -> None:
        guid = host_guid_of(tx, vm.host_id) if vm.host_id is not None else ""
        self._lifecycle.transition(tx, vm, VmEvent.STOP_REQUESTED)
        timeout = self._config.job_stop_timeout_s
        engine.send(tx, job, guid,
                    StopCommand(vm_uuid=vm.uuid, force=force,
                                timeout_s=max(1.0, timeout / 2), undefine=undefine))
        store(job, StopPayload(host=guid))
        job.step = "stop"
        job.deadline = utcnow() + timedelta(seconds=timeout)
