"""Host maintenance as a job: move a host's VMs off, then keep the host out of placement.

``prepare`` (``hostdev host maintenance HOST``) puts the host in
``PrepareForMaintenance`` at once (placement refuses it, as it refuses
``Maintenance``), begins one migrate job per VM that may move (the planner
picks each destination, the host avoided; a VM whose offering forbids
migration while it holds devices stays, and is stopped only when asked), and
records them in a ``maintenance`` job. ``sweep`` (every host sweep) and
``prepare`` itself advance the host: with no VM left on it (none placed
there in a live state, no device reserved there for an incoming migration)
it becomes ``Maintenance`` and the job succeeds; otherwise the host's
``status_reason`` says what keeps it (a failed migration and why, a VM that
forbids migration), and once every job it began has finished, the
maintenance job fails with that reason while the host stays preparing. A
later ``prepare`` retries what is left; ``activate`` returns the host to Up.

With ``dry_run`` nothing changes: the answer is the plan, each VM with its
destination and device mapping (``MigrationManager.plan``, each plan leaving
out the devices the plans before it chose).
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from sqlalchemy import select

from hostdev.messages import api
from hostdev.messages.limits import clip
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DeviceMapping, HostStatus, MaintenanceHold, MaintenanceMove
from hostdev.mgmt.devices import pci_devices
from hostdev.mgmt.devices.device_rows import RESERVED, C, state_is
from hostdev.mgmt.errors import Conflict, Forbidden, NoCapacity
from hostdev.mgmt.hosts.registration import announce_status
from hostdev.mgmt.jobs import engine
from hostdev.mgmt.jobs.jobs import JobManager, find_host
from hostdev.mgmt.jobs.migration import MigrationManager
from hostdev.mgmt.jobs.payloads import (
    MAINTENANCE_JOB,
    MaintenancePayload,
    MigratePayload,
    load,
)
from hostdev.mgmt.persistence.models import (
    HOST_MAINTENANCE,
    HOST_PREPARING,
    HOST_UP,
    JOB_RUNNING,
    OPERATOR_STATUSES,
    STATUS_REASON_LENGTH,
    Host,
    Job,
    ServiceOffering,
    VmInstance,
)
from hostdev.mgmt.persistence.unit_of_work import TxContext
from hostdev.mgmt.placement import blocks
from hostdev.mgmt.vms.vm_states import HOLDS_DEVICES

log = structlog.get_logger()

#: How many of the newest maintenance jobs are searched for a host's.
_RECENT_JOBS = 200


class MaintenanceManager:
    """Empties hosts for maintenance through migrate and stop jobs, and returns them."""

    def __init__(self, jobs: JobManager, migrations: MigrationManager) -> None:
        self._jobs = jobs
        self._migrations = migrations

    # -- requests ------------------------------------------------------------------

    def prepare(self, tx: TxContext, request: api.HostMaintenanceRequest) -> api.MaintenancePlan:
        """Plans (dry run) or begins a host's maintenance; see the module docstring.

        Raises:
            Conflict: the host is in maintenance already, or not reachable
                (Disconnected, Down: its VMs cannot be migrated).
        """
        host = _locked_host(tx, request.host)
        if host.status == HOST_MAINTENANCE:
            raise Conflict(f"host {host.name} is in maintenance already; return it with: "
                           f"hostdev host activate {host.name}")
        if host.status not in (HOST_UP, HOST_PREPARING):
            raise Conflict(f"host {host.name} is {host.status}: its agent does not answer, so "
                           "its VMs cannot be moved off; bring the agent back first")
        if not request.dry_run:
            if host.status != HOST_PREPARING:
                announce_status(tx, host, HOST_PREPARING, host.status)
            host.status = HOST_PREPARING
            tx.session.flush()
        moves: list[MaintenanceMove] = []
        holds: list[MaintenanceHold] = []
        problems: list[str] = []
        payload = MaintenancePayload(host_id=host.id)
        taken: set[tuple[int, PciAddress]] = set()
        with tx.session.no_autoflush:
            for vm, offering in _vms_on(tx, host):
                if vm.state != "Running":
                    problems.append(f"VM {vm.name} is {vm.state}: its job in flight finishes "
                                    "first; run the maintenance again afterwards")
                    continue
                try:
                    moves.append(self._move(tx, vm, request.dry_run, taken, payload))
                except Forbidden:
                    holds.append(self._hold(tx, vm, offering, request, payload))
                except NoCapacity as exc:
                    problems.append(exc.reason)  # it names the VM
        job = None
        if not request.dry_run:
            job = engine.new_job(tx, MAINTENANCE_JOB, None, "migrate", payload, None)
            tx.session.flush()
            for earlier in _jobs_of(tx, host.id):
                if earlier.id != job.id and earlier.state == JOB_RUNNING:
                    engine.finish(tx, earlier, "failed", f"superseded by job {job.id}",
                                  step=earlier.step)
            self.advance(tx, host)
            log.info("host_maintenance_begun", host=host.guid, job=job.id, moves=len(moves),
                     holds=len(holds), problems=len(problems))
        return api.MaintenancePlan(
            host_guid=host.guid, host_name=host.name, status=host.status,
            dry_run=request.dry_run, moves=tuple(moves), holds=tuple(holds),
            problems=tuple(clip(p) for p in problems), job_id=job.id if job else None,
            details=_summary(host, moves, holds, problems, request.dry_run))

    def activate(self, tx: TxContext, ref: str) -> Host:
        """Returns a host in (or preparing for) maintenance to Up; migrations begun go on.

        Raises:
            Conflict: the host is not in maintenance.
        """
        host = _locked_host(tx, ref)
        if host.status not in OPERATOR_STATUSES:
            raise Conflict(f"host {host.name} is {host.status}, not in maintenance: nothing "
                           f"to activate (hostdev host maintenance {host.name} takes it out)")
        for job in _jobs_of(tx, host.id, running=True):
            engine.finish(tx, job, "failed", f"cancelled: host {host.name} was activated "
                          "before it reached maintenance; migrations already begun go on",
                          step=job.step)
        announce_status(tx, host, HOST_UP, host.status)
        host.status = HOST_UP
        host.status_reason = ""
        tx.session.flush()
        blocks.raise_host(tx.session.connection(), host.id)  # placeable again
        return host

    # -- progress ------------------------------------------------------------------

    def sweep(self, tx: TxContext) -> int:
        """Advances every host preparing for maintenance; returns how many reached it."""
        done = 0
        ids = list(tx.session.scalars(select(Host.id).where(Host.status == HOST_PREPARING)))
        for host_id in ids:
            host = tx.session.scalar(select(Host).where(Host.id == host_id).with_for_update())
            if host is not None and host.status == HOST_PREPARING:
                done += self.advance(tx, host) == HOST_MAINTENANCE
        return done

    def advance(self, tx: TxContext, host: Host) -> HostStatus:
        """Puts an emptied host in Maintenance, or records what keeps it; returns its status."""
        left = list(_vms_on(tx, host))
        incoming = tx.session.scalar(select(C.id).where(C.host_id == host.id,
                                                        state_is(RESERVED)).limit(1))
        jobs = _jobs_of(tx, host.id)
        running = [job for job in jobs if job.state == JOB_RUNNING]
        if not left and incoming is None:
            announce_status(tx, host, HOST_MAINTENANCE, host.status)
            host.status = HOST_MAINTENANCE
            host.status_reason = ""
            for job in running:
                engine.finish(tx, job, "succeeded", f"host {host.name} is in maintenance: no "
                              "VM is left on it")
            return host.status
        reasons, in_flight = _reasons(tx, host, left, jobs[:1])
        if incoming is not None:
            reasons.append("a migration to it is still in flight")
        reason = clip("; ".join(reasons), STATUS_REASON_LENGTH)
        if reason != host.status_reason:
            host.status_reason = reason
            log.info("host_maintenance_waiting", host=host.guid, reason=reason)
        if not in_flight:
            for job in running:  # everything it began finished, and VMs are left: say why
                engine.finish(tx, job, "failed", f"host {host.name} stays "
                              f"{HOST_PREPARING}: {reason}", step=job.step)
        return host.status

    # -- internals -----------------------------------------------------------------

    def _move(self, tx: TxContext, vm: VmInstance, dry_run: bool,
              taken: set[tuple[int, PciAddress]],
              payload: MaintenancePayload) -> MaintenanceMove:
        if dry_run:
            plan = self._migrations.plan(tx, vm.uuid, None, taken=taken)
            target = tx.session.scalar(select(Host).where(Host.guid == plan.destination_guid))
            return MaintenanceMove(vm_uuid=vm.uuid, vm_name=vm.name,
                                   destination_guid=plan.destination_guid,
                                   destination_name=target.name if target else "",
                                   devices=plan.devices)
        job = self._migrations.begin(tx, vm.uuid, None)
        payload.migrations.append(job.id)
        migration = load(job, MigratePayload)
        return MaintenanceMove(
            vm_uuid=vm.uuid, vm_name=vm.name, destination_guid=migration.destination,
            destination_name=migration.destination_name, job_id=job.id,
            devices=tuple(DeviceMapping(name=name, source=PciAddress(source),
                                        destination=PciAddress(destination))
                          for name, source, destination in migration.mapping))

    def _hold(self, tx: TxContext, vm: VmInstance, offering: ServiceOffering,
              request: api.HostMaintenanceRequest,
              payload: MaintenancePayload) -> MaintenanceHold:
        devices = tuple(d.address for d in pci_devices.devices_of_vm(tx.connection, vm.id)
                        if d.host_id == vm.host_id)
        stop_job = None
        if request.stop and not request.dry_run:
            stop_job = self._jobs.stop(tx, vm.uuid)
            payload.stops.append(stop_job.id)
        return MaintenanceHold(vm_uuid=vm.uuid, vm_name=vm.name, offering=offering.name,
                               devices=devices,
                               stop_job_id=stop_job.id if stop_job is not None else None)


def _locked_host(tx: TxContext, ref: str) -> Host:
    host = find_host(tx.session, ref)
    locked = tx.session.scalar(select(Host).where(Host.id == host.id).with_for_update())
    assert locked is not None
    return locked


def _vms_on(tx: TxContext, host: Host) -> list[tuple[VmInstance, ServiceOffering]]:
    """Returns the VMs placed on a host in a live state, with their offerings, by id."""
    rows = tx.session.execute(
        select(VmInstance, ServiceOffering)
        .join(ServiceOffering, ServiceOffering.id == VmInstance.offering_id)
        .where(VmInstance.host_id == host.id, VmInstance.state.in_(sorted(HOLDS_DEVICES)))
        .order_by(VmInstance.id))
    return [(vm, offering) for vm, offering in rows]


def _jobs_of(tx: TxContext, host_id: int, *, running: bool = False) -> list[Job]:
    """Returns a host's maintenance jobs, newest first: the running ones, or the recent ones.

    The running ones are locked; the newest job says what the host waits for.
    """
    query = select(Job).where(Job.kind == MAINTENANCE_JOB)
    if running:
        query = query.where(Job.state == JOB_RUNNING)
    jobs = tx.session.scalars(query.order_by(Job.id.desc()).limit(_RECENT_JOBS)
                              .with_for_update())
    return [job for job in jobs if load(job, MaintenancePayload).host_id == host_id]


def _reasons(tx: TxContext, host: Host, left: Sequence[tuple[VmInstance, ServiceOffering]],
             jobs: Sequence[Job]) -> tuple[list[str], bool]:
    """Says what keeps a host preparing; and whether a job the maintenance began still runs."""
    reasons: list[str] = []
    in_flight = False
    begun: list[int] = []
    for job in jobs:
        payload = load(job, MaintenancePayload)
        begun += payload.migrations + payload.stops
    for child in tx.session.scalars(select(Job).where(Job.id.in_(begun)).order_by(Job.id)):
        if child.state == JOB_RUNNING:
            in_flight = True
        elif child.state == "failed":
            reasons.append(f"{child.kind} job {child.id} failed: {child.details}")
    for vm, offering in left:
        if vm.state != "Running":
            reasons.append(f"VM {vm.name} is {vm.state}")
        elif offering.migration_policy == "forbid" and any(
                d.host_id == host.id for d in pci_devices.devices_of_vm(tx.connection, vm.id)):
            reasons.append(f"VM {vm.name} runs with offering {offering.name!r}, which forbids "
                           f"migration: stop it, or run hostdev host maintenance {host.name} "
                           "--stop")
        else:
            reasons.append(f"VM {vm.name} still runs here: run hostdev host maintenance "
                           f"{host.name} again to move it")
    return reasons, in_flight


def _summary(host: Host, moves: Sequence[MaintenanceMove], holds: Sequence[MaintenanceHold],
             problems: Sequence[str], dry_run: bool) -> str:
    verb = "would move" if dry_run else "moving"
    text = f"{host.name}: {verb} {len(moves)} VM(s), {len(holds)} forbid migration"
    if problems:
        text += f", {len(problems)} cannot move now"
    return text + ("; nothing was changed" if dry_run else f"; host is {host.status}")
