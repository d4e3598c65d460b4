"""Answers every API request of ``hostdev.messages.api``.

Each handler runs in the transaction the service's pipeline opens for the
request (a lost race retries it whole; the outbox is published after
commit). Each request returns its typed response or raises a ``MgmtError``
that the pipeline turns into an ``ErrorAnswer`` with the error's ``code``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import aliased

from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.bus.contract import Incoming
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import HostRow, OfferingRow, VmRow
from hostdev.mgmt.api.offerings import check_names_exist, parse_pci_devices
from hostdev.mgmt.api.template_handlers import template_routes
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.devices import cleaning, device_admin, pci_devices
from hostdev.mgmt.devices.device_rows import (
    ADDRESS_COLUMNS,
    FREE,
    REMOVED,
    address_is,
    address_of,
    api_row,
)
from hostdev.mgmt.errors import Conflict, NotFound
from hostdev.mgmt.jobs.jobs import JobManager, find_host, find_offering, job_row
from hostdev.mgmt.jobs.maintenance import MaintenanceManager
from hostdev.mgmt.jobs.migration import MigrationManager
from hostdev.mgmt.persistence.models import (
    VM_DESTROYED,
    Host,
    Job,
    PciDevice,
    ServiceOffering,
    ServiceOfferingPciRequest,
    VmInstance,
)
from hostdev.mgmt.persistence.unit_of_work import TxContext
from hostdev.mgmt.pipeline import Route, always, never
from hostdev.mgmt.placement import planner
from hostdev.mgmt.vms.templates import find_template
from hostdev.mgmt.vms.vm_lifecycle import offering_numa_policy, offering_requests


def _iso(value: Any) -> str | None:
    return value.isoformat() + "Z" if value is not None else None


def _route(fn: Callable[[TxContext, Any], Message],
           record: Callable[[Any], bool] = never) -> Route:
    """Routes a request to ``fn(tx, request)``."""
    def work(tx: TxContext, request: Any, _incoming: Incoming) -> Message:
        return fn(tx, request)
    return Route(work, record)


def _not_dry_run(request: api.MigrateVmRequest | api.HostMaintenanceRequest) -> bool:
    """A migration or maintenance is recorded; its dry run, which changes nothing, is not."""
    return not request.dry_run


class ApiHandlers:
    """One method per API request type; ``routes()`` maps types to them."""

    def __init__(self, config: MgmtConfig, jobs: JobManager,
                 migrations: MigrationManager, maintenance: MaintenanceManager) -> None:
        self._config = config
        self._jobs = jobs
        self.migrations = migrations
        self.maintenance = maintenance

    def routes(self) -> dict[type[Message], Route]:
        """Returns the route of each API request type; changes are recorded."""
        return {
            api.ListHostsRequest: _route(self.list_hosts),
            api.ListPciDevicesRequest: _route(self.list_devices),
            api.ListVmsRequest: _route(self.list_vms),
            api.ListOfferingsRequest: _route(self.list_offerings),
            api.ListJobsRequest: _route(self.list_jobs),
            api.GetJobRequest: _route(self.get_job),
            api.ExplainPlacementRequest: _route(self.explain),
            api.CreateOfferingRequest: _route(self.create_offering, always),
            api.DeployVmRequest: _route(self.deploy, always),
            api.StartVmRequest: _route(self.start, always),
            api.StopVmRequest: _route(self.stop, always),
            api.DestroyVmRequest: _route(self.destroy, always),
            api.MigrateVmRequest: _route(self.migrate, _not_dry_run),
            api.AttachVmDevicesRequest: _route(self.attach, always),
            api.SetPciDeviceEnabledRequest: _route(self.set_device_enabled, always),
            **template_routes(),
            api.HostMaintenanceRequest: _route(self.maintenance.prepare, _not_dry_run),
            api.ActivateHostRequest: _route(self.activate_host, always),
        }

    # -- queries ------------------------------------------------------------------

    def list_hosts(self, tx: TxContext, request: api.ListHostsRequest) -> api.HostList:
        """Lists hosts (or the one named) with status, device counts and foreign domains."""
        query = select(Host).order_by(Host.id)
        only = find_host(tx.session, request.host).id if request.host else None
        if only is not None:
            query = query.where(Host.id == only)
        counts: dict[int, tuple[int, int]] = {}
        for entry in pci_devices.device_counts(tx.session.connection(), only):
            free, total = counts.get(entry.host_id, (0, 0))
            counts[entry.host_id] = (free + entry.free, total + entry.total)
        rows = tuple(
            HostRow(id=h.id, guid=h.guid, name=h.name, status=h.status,
                    cpus=h.cpus, memory_mb=h.memory_mb, last_ping=_iso(h.last_ping),
                    free_devices=counts.get(h.id, (0, 0))[0],
                    total_devices=counts.get(h.id, (0, 0))[1],
                    foreign_domains=h.foreign_domains, status_reason=h.status_reason,
                    reset_on_release=h.reset_on_release)
            for h in tx.session.scalars(query))
        return api.HostList(hosts=rows)

    def list_devices(self, tx: TxContext, request: api.ListPciDevicesRequest) -> api.PciDeviceList:
        """Lists devices (not the removed ones), of one host or only free ones if asked."""
        query = (select(PciDevice, Host.guid, Host.name, VmInstance.uuid)
                 .join(Host, Host.id == PciDevice.host_id)
                 .outerjoin(VmInstance, VmInstance.id == PciDevice.instance_id)
                 .where(PciDevice.state != REMOVED)
                 .order_by(Host.id, *ADDRESS_COLUMNS))
        if request.host:
            query = query.where(PciDevice.host_id == find_host(tx.session, request.host).id)
        if request.free_only:
            # "Free" means placeable: a device of a host that is not Up is
            # free in its own state but not offered.
            query = query.where(PciDevice.state == FREE, Host.status == planner.PLACEABLE)
        rows = tuple(api_row(d, guid, name, vm_uuid)
                     for d, guid, name, vm_uuid in tx.session.execute(query))
        return api.PciDeviceList(devices=rows)

    def list_vms(self, tx: TxContext, request: api.ListVmsRequest) -> api.VmList:
        """Lists live VMs with their host and the devices they hold."""
        held: dict[int, list[PciAddress]] = {}
        for device in tx.session.scalars(select(PciDevice)
                                         .where(PciDevice.instance_id.is_not(None))
                                         .order_by(PciDevice.id)):
            held.setdefault(device.instance_id or 0, []).append(address_of(device))
        host = aliased(Host)
        query = (select(VmInstance, ServiceOffering.name, ServiceOffering.template_name,
                        host.guid, host.name)
                 .join(ServiceOffering, ServiceOffering.id == VmInstance.offering_id)
                 .outerjoin(host, host.id == VmInstance.host_id)
                 .where(VmInstance.state != VM_DESTROYED).order_by(VmInstance.id))
        rows = tuple(
            VmRow(uuid=vm.uuid, name=vm.name, offering=offering, state=vm.state,
                  host_guid=guid, host_name=name, pci_devices=tuple(held.get(vm.id, ())),
                  template=template or "", template_version=vm.template_version,
                  console_path=vm.console_path or "", numa_node=vm.numa_node)
            for vm, offering, template, guid, name in tx.session.execute(query))
        return api.VmList(vms=rows)

    def _offering_row(self, tx: TxContext, offering: ServiceOffering) -> OfferingRow:
        return OfferingRow(id=offering.id, name=offering.name, cpus=offering.cpus,
                           memory_mb=offering.memory_mb,
                           pci_requests=offering_requests(tx, offering.id),
                           migration_policy=offering.migration_policy,
                           template=offering.template_name or "",
                           numa_policy=offering.numa_policy)

    def list_offerings(self, tx: TxContext, request: api.ListOfferingsRequest) -> api.OfferingList:
        """Lists service offerings."""
        return api.OfferingList(offerings=tuple(
            self._offering_row(tx, o)
            for o in tx.session.scalars(select(ServiceOffering).order_by(ServiceOffering.id))))

    def list_jobs(self, tx: TxContext, request: api.ListJobsRequest) -> api.JobList:
        """Lists the most recent jobs, newest first."""
        jobs = tx.session.scalars(select(Job).order_by(Job.id.desc())
                                  .limit(request.limit))  # 1..MAX_JOBS_LISTED since decode
        return api.JobList(jobs=tuple(job_row(tx.session, job) for job in jobs))

    def get_job(self, tx: TxContext, request: api.GetJobRequest) -> api.JobList:
        """Returns one job."""
        job = tx.session.get(Job, request.job_id)
        if job is None:
            raise NotFound(f"job {request.job_id} does not exist; list jobs with the "
                           "ListJobsRequest API call")
        return api.JobList(jobs=(job_row(tx.session, job),))

    def explain(self, tx: TxContext,
                request: api.ExplainPlacementRequest) -> api.PlacementExplanation:
        """Says, per host, whether it would take the offering and why not."""
        offering = find_offering(tx.session, request.offering)
        demand = planner.Demand(cpus=offering.cpus, memory_mb=offering.memory_mb,
                                pci=offering_requests(tx, offering.id),
                                numa=offering_numa_policy(tx, offering.id))
        verdicts = planner.explain(tx.session, demand, request.avoid)
        return api.PlacementExplanation(offering=offering.name, requests=demand.pci,
                                        verdicts=tuple(verdicts))

    # -- changes ------------------------------------------------------------------

    def create_offering(self, tx: TxContext,
                        request: api.CreateOfferingRequest) -> api.OfferingList:
        """Creates an offering; device names must be ones some host reports."""
        name = request.name  # its rule and the CPU and memory ranges hold since decode
        requests = parse_pci_devices(request.pci_devices)
        policy = request.migration_policy or self._config.pci_migration_policy

        known = tx.session.scalars(select(PciDevice.name).distinct()
                                .where(PciDevice.state != REMOVED))
        check_names_exist(requests, list(known))
        if tx.session.scalar(select(ServiceOffering.id).where(ServiceOffering.name == name)):
            raise Conflict(f"an offering named {name!r} exists already; pick another name")
        if request.template is not None:
            find_template(tx.session, request.template)  # NotFound lists the templates
        offering = ServiceOffering(name=name, cpus=request.cpus,
                                   memory_mb=request.memory_mb, migration_policy=policy,
                                   template_name=request.template,
                                   numa_policy=request.numa_policy or "none")
        tx.session.add(offering)
        tx.session.flush()
        for pci in requests:
            tx.session.add(ServiceOfferingPciRequest(offering_id=offering.id, name=pci.name,
                                                  count=pci.count))
        tx.session.flush()
        return api.OfferingList(offerings=(self._offering_row(tx, offering),))

    def deploy(self, tx: TxContext, request: api.DeployVmRequest) -> api.JobAccepted:
        """Creates, places and starts a VM; refused at once when no host fits."""
        job, vm = self._jobs.deploy(tx, request.name, request.offering, request.avoid)
        return api.JobAccepted(job_id=job.id, vm_uuid=vm.uuid)

    def start(self, tx: TxContext, request: api.StartVmRequest) -> api.JobAccepted:
        """Places and starts a stopped VM."""
        job = self._jobs.start(tx, request.vm)
        return api.JobAccepted(job_id=job.id, vm_uuid=self._uuid(tx, job))

    def stop(self, tx: TxContext, request: api.StopVmRequest) -> api.JobAccepted:
        """Stops a running VM."""
        job = self._jobs.stop(tx, request.vm, force=request.force)
        return api.JobAccepted(job_id=job.id, vm_uuid=self._uuid(tx, job))

    def destroy(self, tx: TxContext, request: api.DestroyVmRequest) -> api.JobAccepted:
        """Destroys a VM, releasing its devices."""
        job = self._jobs.destroy(tx, request.vm)
        return api.JobAccepted(job_id=job.id, vm_uuid=self._uuid(tx, job))

    def _uuid(self, tx: TxContext, job: Job) -> str | None:
        return tx.session.scalar(select(VmInstance.uuid).where(VmInstance.id == job.vm_id))

    def migrate(self, tx: TxContext, request: api.MigrateVmRequest) -> Message:
        """Plans (dry run) or begins a live migration; see ``hostdev.mgmt.jobs.migration``."""
        if request.dry_run:
            return self.migrations.plan(tx, request.vm, request.destination)
        job = self.migrations.begin(tx, request.vm, request.destination)
        return api.JobAccepted(job_id=job.id, vm_uuid=self._uuid(tx, job))

    def attach(self, tx: TxContext, request: api.AttachVmDevicesRequest) -> api.JobAccepted:
        """Re-attaches the devices a Running VM holds on its host (a job)."""
        job = self.migrations.attach_devices(tx, request.vm)
        return api.JobAccepted(job_id=job.id, vm_uuid=self._uuid(tx, job))

    def activate_host(self, tx: TxContext, request: api.ActivateHostRequest) -> api.HostList:
        """Returns a host in (or preparing for) maintenance to Up."""
        host = self.maintenance.activate(tx, request.host)
        return self.list_hosts(tx, api.ListHostsRequest(host=host.guid))

    def set_device_enabled(self, tx: TxContext,
                           request: api.SetPciDeviceEnabledRequest) -> api.DeviceStateChanged:
        """Disables a free device (never offered again) or enables it back."""
        host = find_host(tx.session, request.host)
        address = PciAddress(request.address)
        device = tx.session.scalar(select(PciDevice).where(
            PciDevice.host_id == host.id, address_is(address)))
        if device is None:
            raise NotFound(f"host {host.name} has no PCI device {address}; list them with: "
                           f"hostdev devices --host {host.name}")
        conn = tx.session.connection()
        if request.enabled:
            # A device whose reset failed is enabled by asking for the reset again.
            if not cleaning.retry_reset(tx, host, device.id):
                device_admin.enable_device(conn, device.id)
        else:
            device_admin.disable_device(conn, device.id, request.reason)
        tx.session.refresh(device)
        vm_uuid = tx.session.scalar(select(VmInstance.uuid)
                                 .where(VmInstance.id == device.instance_id))
        return api.DeviceStateChanged(device=api_row(device, host.guid, host.name, vm_uuid))
