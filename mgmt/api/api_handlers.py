"""Answers every API request of ``hostdev.messages.api`` (DESIGN section 5).

Queries read in one transaction; changes run through the ``UnitOfWork`` so a
lost race is retried and the outbox is published after commit. Each request
returns its typed response or raises a ``MgmtError`` that the service turns
into an ``ErrorAnswer`` with the error's ``code``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import HostRow, OfferingRow, VmRow
from hostdev.mgmt.api.offerings import check_names_exist, parse_pci_devices
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.devices import pci_devices
from hostdev.mgmt.devices.device_rows import (
    ADDRESS_COLUMNS,
    FREE,
    REMOVED,
    address_is,
    address_of,
    api_row,
)
from hostdev.mgmt.errors import Conflict, InvalidRequest, NotFound
from hostdev.mgmt.jobs.jobs import JobManager, find_host, find_offering, job_row
from hostdev.mgmt.jobs.migration import MigrationManager
from hostdev.mgmt.persistence.models import (
    Host,
    Job,
    PciDevice,
    ServiceOffering,
    ServiceOfferingPciRequest,
    VmInstance,
)
from hostdev.mgmt.persistence.unit_of_work import UnitOfWork
from hostdev.mgmt.placement import planner
from hostdev.mgmt.vms.vm_lifecycle import offering_requests


def _iso(value: Any) -> str | None:
    return value.isoformat() + "Z" if value is not None else None



class ApiHandlers:
    """One method per API request type; ``handlers()`` maps types to them."""

    def __init__(self, config: MgmtConfig, work: UnitOfWork, jobs: JobManager,
                 migrations: MigrationManager | None = None) -> None:
        self._config = config
        self._work = work
        self._jobs = jobs
        self.migrations = migrations or MigrationManager(config, jobs._lifecycle)

    def handlers(self) -> dict[type[Message], Callable[..., Message]]:
        """Returns the handler of each API request type."""
        return {
            api.ListHostsRequest: self.list_hosts,
            api.ListPciDevicesRequest: self.list_devices,
            api.ListVmsRequest: self.list_vms,
            api.ListOfferingsRequest: self.list_offerings,
            api.ListJobsRequest: self.list_jobs,
            api.GetJobRequest: self.get_job,
            api.ExplainPlacementRequest: self.explain,
            api.CreateOfferingRequest: self.create_offering,
            api.DeployVmRequest: self.deploy,
            api.StartVmRequest: self.start,
            api.StopVmRequest: self.stop,
            api.DestroyVmRequest: self.destroy,
            api.MigrateVmRequest: self.migrate,
            api.AttachVmDevicesRequest: self.attach,
            api.SetPciDeviceEnabledRequest: self.set_device_enabled,
        }

    # -- queries ------------------------------------------------------------------

    def list_hosts(self, request: api.ListHostsRequest) -> api.HostList:
        """Lists hosts with status and free/total device counts."""
        def work(session: Session) -> api.HostList:
            counts: dict[int, tuple[int, int]] = {}
            for entry in pci_devices.device_counts(session.connection()):
                free, total = counts.get(entry.host_id, (0, 0))
                counts[entry.host_id] = (free + entry.free, total + entry.total)
            rows = tuple(
                HostRow(id=h.id, guid=h.guid, name=h.name, status=h.status,
                        cpus=h.cpus, memory_mb=h.memory_mb, last_ping=_iso(h.last_ping),
                        free_devices=counts.get(h.id, (0, 0))[0],
                        total_devices=counts.get(h.id, (0, 0))[1])
                for h in session.scalars(select(Host).order_by(Host.id)))
            return api.HostList(hosts=rows)
        return self._work.run(work, what="list hosts")

    def list_devices(self, request: api.ListPciDevicesRequest) -> api.PciDeviceList:
        """Lists devices (not the removed ones), of one host or only free ones if asked."""
        def work(session: Session) -> api.PciDeviceList:
            query = (select(PciDevice, Host.guid, Host.name, VmInstance.uuid)
                     .join(Host, Host.id == PciDevice.host_id)
                     .outerjoin(VmInstance, VmInstance.id == PciDevice.instance_id)
                     .where(PciDevice.state != REMOVED)
                     .order_by(Host.id, *ADDRESS_COLUMNS))
            if request.host:
                query = query.where(PciDevice.host_id == find_host(session, request.host).id)
            if request.free_only:
                # "Free" means placeable: a device of a host that is not Up is
                # free in its own state but not offered (DESIGN section 7).
                query = query.where(PciDevice.state == FREE, Host.status == planner.PLACEABLE)
            rows = tuple(api_row(d, guid, name, vm_uuid)
                         for d, guid, name, vm_uuid in session.execute(query))
            return api.PciDeviceList(devices=rows)
        return self._work.run(work, what="list devices")

    def list_vms(self, request: api.ListVmsRequest) -> api.VmList:
        """Lists live VMs with their host and the devices they hold."""
        def work(session: Session) -> api.VmList:
            held: dict[int, list[PciAddress]] = {}
            for device in session.scalars(select(PciDevice)
                                          .where(PciDevice.instance_id.is_not(None))
                                          .order_by(PciDevice.id)):
                held.setdefault(device.instance_id or 0, []).append(address_of(device))
            host = aliased(Host)
            query = (select(VmInstance, ServiceOffering.name, host.guid, host.name)
                     .join(ServiceOffering, ServiceOffering.id == VmInstance.offering_id)
                     .outerjoin(host, host.id == VmInstance.host_id)
                     .where(VmInstance.state != "Destroyed").order_by(VmInstance.id))
            rows = tuple(
                VmRow(uuid=vm.uuid, name=vm.name, offering=offering, state=vm.state,  # type: ignore[arg-type]
                      host_guid=guid, host_name=name, pci_devices=tuple(held.get(vm.id, ())))
                for vm, offering, guid, name in session.execute(query))
            return api.VmList(vms=rows)
        return self._work.run(work, what="list VMs")

    def _offering_row(self, session: Session, offering: ServiceOffering) -> OfferingRow:
        return OfferingRow(id=offering.id, name=offering.name, cpus=offering.cpus,
                           memory_mb=offering.memory_mb,
                           pci_requests=offering_requests(session, offering.id),
                           migration_policy=offering.migration_policy)  # type: ignore[arg-type]

    def list_offerings(self, request: api.ListOfferingsRequest) -> api.OfferingList:
        """Lists service offerings."""
        def work(session: Session) -> api.OfferingList:
            return api.OfferingList(offerings=tuple(
                self._offering_row(session, o)
                for o in session.scalars(select(ServiceOffering).order_by(ServiceOffering.id))))
        return self._work.run(work, what="list offerings")

    def list_jobs(self, request: api.ListJobsRequest) -> api.JobList:
        """Lists the most recent jobs, newest first."""
        def work(session: Session) -> api.JobList:
            jobs = session.scalars(select(Job).order_by(Job.id.desc())
                                   .limit(max(1, min(request.limit, 1000))))
            return api.JobList(jobs=tuple(job_row(session, job) for job in jobs))
        return self._work.run(work, what="list jobs")

    def get_job(self, request: api.GetJobRequest) -> api.JobList:
        """Returns one job."""
        def work(session: Session) -> api.JobList:
            job = session.get(Job, request.job_id)
            if job is None:
                raise NotFound(f"job {request.job_id} does not exist; list jobs with the "
                               "ListJobsRequest API call")
            return api.JobList(jobs=(job_row(session, job),))
        return self._work.run(work, what="get job")

    def explain(self, request: api.ExplainPlacementRequest) -> api.PlacementExplanation:
        """Says, per host, whether it would take the offering and why not."""
        def work(session: Session) -> api.PlacementExplanation:
            offering = find_offering(session, request.offering)
            demand = planner.Demand(cpus=offering.cpus, memory_mb=offering.memory_mb,
                                    pci=offering_requests(session, offering.id))
            verdicts = planner.explain(session, demand, request.avoid)
            return api.PlacementExplanation(offering=offering.name, requests=demand.pci,
                                            verdicts=tuple(verdicts))
        return self._work.run(work, what="explain placement")

    # -- changes ------------------------------------------------------------------

    def create_offering(self, request: api.CreateOfferingRequest,
                        message_id: str | None = None) -> api.OfferingList:
        """Creates an offering; device names must be ones some host reports."""
        name = request.name.strip()
        if not name:
            raise InvalidRequest("an offering needs a name")
        if request.cpus < 1 or request.memory_mb < 1:
            raise InvalidRequest(f"offering {name}: cpus ({request.cpus}) and memory_mb "
                                 f"({request.memory_mb}) must be at least 1")
        requests = parse_pci_devices(request.pci_devices)
        policy = request.migration_policy or self._config.pci_migration_policy

        def work(session: Session) -> api.OfferingList:
            known = session.scalars(select(PciDevice.name).distinct()
                                    .where(PciDevice.state != REMOVED))
            check_names_exist(requests, list(known))
            if session.scalar(select(ServiceOffering.id).where(ServiceOffering.name == name)):
                raise Conflict(f"an offering named {name!r} exists already; pick another name")
            offering = ServiceOffering(name=name, cpus=request.cpus,
                                       memory_mb=request.memory_mb, migration_policy=policy)
            session.add(offering)
            session.flush()
            for pci in requests:
                session.add(ServiceOfferingPciRequest(offering_id=offering.id, name=pci.name,
                                                      count=pci.count))
            session.flush()
            return api.OfferingList(offerings=(self._offering_row(session, offering),))
        return self._work.run(work, what="create offering",
                              message_id=message_id)

    def deploy(self, request: api.DeployVmRequest,
               message_id: str | None = None) -> api.JobAccepted:
        """Creates, places and starts a VM; refused at once when no host fits."""
        def work(session: Session) -> api.JobAccepted:
            job, vm = self._jobs.deploy(session, request.name, request.offering, request.avoid)
            return api.JobAccepted(job_id=job.id, vm_uuid=vm.uuid)
        return self._work.run(work, what=f"deploy {request.name}",
                              message_id=message_id)

    def start(self, request: api.StartVmRequest, message_id: str | None = None) -> api.JobAccepted:
        """Places and starts a stopped VM."""
        def work(session: Session) -> api.JobAccepted:
            job = self._jobs.start(session, request.vm)
            return api.JobAccepted(job_id=job.id, vm_uuid=self._uuid(session, job))
        return self._work.run(work, what=f"start {request.vm}",
                              message_id=message_id)

    def stop(self, request: api.StopVmRequest, message_id: str | None = None) -> api.JobAccepted:
        """Stops a running VM."""
        def work(session: Session) -> api.JobAccepted:
            job = self._jobs.stop(session, request.vm, force=request.force)
            return api.JobAccepted(job_id=job.id, vm_uuid=self._uuid(session, job))
        return self._work.run(work, what=f"stop {request.vm}",
                              message_id=message_id)

    def destroy(self, request: api.DestroyVmRequest,
                message_id: str | None = None) -> api.JobAccepted:
        """Destroys a VM, releasing its devices."""
        def work(session: Session) -> api.JobAccepted:
            job = self._jobs.destroy(session, request.vm)
            return api.JobAccepted(job_id=job.id, vm_uuid=self._uuid(session, job))
        return self._work.run(work, what=f"destroy {request.vm}",
                              message_id=message_id)

    def _uuid(self, session: Session, job: Job) -> str | None:
        return session.scalar(select(VmInstance.uuid).where(VmInstance.id == job.vm_id))

    def migrate(self, request: api.MigrateVmRequest,
                message_id: str | None = None) -> Message:
        """Plans (dry run) or begins a live migration; see ``hostdev.mgmt.jobs.migration``."""
        if request.dry_run:
            return self._work.run(lambda s: self.migrations.plan(s, request.vm,
                                                                 request.destination),
                                  what=f"plan migration of {request.vm}")

        def work(session: Session) -> api.JobAccepted:
            job = self.migrations.begin(session, request.vm, request.destination)
            return api.JobAccepted(job_id=job.id, vm_uuid=self._uuid(session, job))
        return self._work.run(work, what=f"migrate {request.vm}", message_id=message_id)

    def attach(self, request: api.AttachVmDevicesRequest,
               message_id: str | None = None) -> api.JobAccepted:
        """Re-attaches the devices a Running VM holds on its host (a job)."""
        def work(session: Session) -> api.JobAccepted:
            job = self.migrations.attach_devices(session, request.vm)
            return api.JobAccepted(job_id=job.id, vm_uuid=self._uuid(session, job))
        return self._work.run(work, what=f"attach devices of {request.vm}",
                              message_id=message_id)

    def set_device_enabled(self, request: api.SetPciDeviceEnabledRequest,
                           message_id: str | None = None) -> api.DeviceStateChanged:
        """Disables a free device (never offered again) or enables it back."""
        def work(session: Session) -> api.DeviceStateChanged:
            host = find_host(session, request.host)
            address = PciAddress(request.address)
            device = session.scalar(select(PciDevice).where(
                PciDevice.host_id == host.id, address_is(address)))
            if device is None:
                raise NotFound(f"host {host.name} has no PCI device {address}; list them with: "
                               f"hostdev devices --host {host.name}")
            conn = session.connection()
            if request.enabled:
                pci_devices.enable_device(conn, device.id)
            else:
                pci_devices.disable_device(conn, device.id)
            session.refresh(device)
            vm_uuid = session.scalar(select(VmInstance.uuid)
                                     .where(VmInstance.id == device.instance_id))
            return api.DeviceStateChanged(device=api_row(device, host.guid, host.name, vm_uuid))
        return self._work.run(work, what="set device enabled",
                              message_id=message_id)
