"""API requests (any client to management) and their responses.

Requests are sent to ``api.<Type>`` with a ``reply_to``; long operations
answer ``JobAccepted`` at once and finish asynchronously (``job.<id>.*``
events, ``GetJobRequest``).
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec

from hostdev.messages.base import Answer, Message
from hostdev.messages.limits import (
    MAX_DEVICES,
    MAX_ROWS,
    Cpus,
    Details,
    DomainXml,
    Guid,
    HostRefs,
    Id,
    JobLimit,
    Label,
    MemoryMb,
    OfferingName,
    PciDeviceText,
    Reason,
    Ref,
    TemplateName,
    Uuid,
    VmName,
)
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import (
    DeviceMapping,
    HostRow,
    HostStatus,
    HostVerdict,
    JobRow,
    MaintenanceHold,
    MaintenanceMove,
    MigrationPolicy,
    NumaPolicy,
    OfferingRow,
    PciDeviceRow,
    PciRequests,
    TemplateRow,
    VmRow,
)


class ApiRequest(Message, frozen=True, kw_only=True):
    """A request from any client; answered on its ``reply_to``."""

    kind: ClassVar[str] = "api"


# -- queries ------------------------------------------------------------------


class ListHostsRequest(ApiRequest, frozen=True, kw_only=True):
    """List hosts with status and device counts; only ``host`` (name or guid) when given."""

    host: Ref | None = None


class ListPciDevicesRequest(ApiRequest, frozen=True, kw_only=True):
    """List passthrough devices, optionally of one host or only free ones."""

    host: Ref | None = None
    free_only: bool = False


class ListVmsRequest(ApiRequest, frozen=True, kw_only=True):
    """List VMs."""


class ListOfferingsRequest(ApiRequest, frozen=True, kw_only=True):
    """List service offerings."""


class ListJobsRequest(ApiRequest, frozen=True, kw_only=True):
    """List recent jobs."""

    limit: JobLimit = 50


class GetJobRequest(ApiRequest, frozen=True, kw_only=True):
    """One job by id."""

    job_id: Id


class ExplainPlacementRequest(ApiRequest, frozen=True, kw_only=True):
    """Why each host would be accepted or rejected for an offering."""

    offering: Ref
    avoid: HostRefs = ()


# -- changes ------------------------------------------------------------------


class CreateOfferingRequest(ApiRequest, frozen=True, kw_only=True):
    """Create a service offering; ``pci_devices`` as in the original: ``10GE,10GE``."""

    name: OfferingName
    cpus: Cpus = 1
    memory_mb: MemoryMb = 512
    pci_devices: PciDeviceText = ""
    migration_policy: MigrationPolicy | None = None
    numa_policy: NumaPolicy | None = None
    #: The domain template its VMs are built from; None: the minimal domain.
    template: TemplateName | None = None


class DeployVmRequest(ApiRequest, frozen=True, kw_only=True):
    """Create a VM from an offering, place it and start it (a job)."""

    name: VmName
    offering: Ref
    avoid: HostRefs = ()


class StartVmRequest(ApiRequest, frozen=True, kw_only=True):
    """Start a stopped VM (a job)."""

    vm: Ref


class StopVmRequest(ApiRequest, frozen=True, kw_only=True):
    """Stop a running VM (a job)."""

    vm: Ref
    force: bool = False


class DestroyVmRequest(ApiRequest, frozen=True, kw_only=True):
    """Stop if needed and remove a VM, releasing its devices (a job)."""

    vm: Ref


class MigrateVmRequest(ApiRequest, frozen=True, kw_only=True):
    """Live-migrate a VM (a job), to ``destination`` or wherever placement finds."""

    vm: Ref
    destination: Ref | None = None
    dry_run: bool = False


class AttachVmDevicesRequest(ApiRequest, frozen=True, kw_only=True):
    """Retry attaching the devices a VM holds but does not have (a job)."""

    vm: Ref


class SetPciDeviceEnabledRequest(ApiRequest, frozen=True, kw_only=True):
    """Disable a device (never offered again) or enable it back."""

    host: Ref
    address: PciAddress
    enabled: bool
    #: Why the device is disabled, kept with it and listed; ignored when enabling.
    reason: Reason = ""


class CreateTemplateRequest(ApiRequest, frozen=True, kw_only=True):
    """Upload a domain template; a template of that name gets a new version."""

    name: TemplateName
    xml: DomainXml


class ListTemplatesRequest(ApiRequest, frozen=True, kw_only=True):
    """List domain templates, each at its newest version."""


class ShowTemplateRequest(ApiRequest, frozen=True, kw_only=True):
    """One template with its XML: the newest version, or ``version``."""

    name: TemplateName
    version: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)] | None = None


class DeleteTemplateRequest(ApiRequest, frozen=True, kw_only=True):
    """Delete every version of a template; refused while an offering names it."""

    name: TemplateName
class HostMaintenanceRequest(ApiRequest, frozen=True, kw_only=True):
    """Put a host into maintenance: move its VMs off, then keep it from placement.

    ``dry_run`` only answers the plan; ``stop`` also stops the VMs whose
    offering forbids migration (otherwise they are listed and the host waits).
    """

    host: Ref
    dry_run: bool = False
    stop: bool = False


class ActivateHostRequest(ApiRequest, frozen=True, kw_only=True):
    """Return a host in (or preparing for) maintenance to service (Up)."""

    host: Ref


# -- responses ----------------------------------------------------------------


class ApiResponse(Answer, frozen=True, kw_only=True):
    """A response to an API request; errors are ``ErrorAnswer``."""


class HostList(ApiResponse, frozen=True, kw_only=True):
    """Response to ``ListHostsRequest``."""

    hosts: Annotated[tuple[HostRow, ...], msgspec.Meta(max_length=MAX_ROWS)] = ()


class PciDeviceList(ApiResponse, frozen=True, kw_only=True):
    """Response to ``ListPciDevicesRequest``."""

    devices: Annotated[tuple[PciDeviceRow, ...], msgspec.Meta(max_length=MAX_ROWS)] = ()


class VmList(ApiResponse, frozen=True, kw_only=True):
    """Response to ``ListVmsRequest``."""

    vms: Annotated[tuple[VmRow, ...], msgspec.Meta(max_length=MAX_ROWS)] = ()


class OfferingList(ApiResponse, frozen=True, kw_only=True):
    """Response to ``ListOfferingsRequest`` and ``CreateOfferingRequest``."""

    offerings: Annotated[tuple[OfferingRow, ...], msgspec.Meta(max_length=MAX_ROWS)] = ()


class TemplateList(ApiResponse, frozen=True, kw_only=True):
    """Response to the template requests: the templates created, listed, shown or deleted."""

    templates: Annotated[tuple[TemplateRow, ...], msgspec.Meta(max_length=MAX_ROWS)] = ()


class JobList(ApiResponse, frozen=True, kw_only=True):
    """Response to ``ListJobsRequest`` and ``GetJobRequest``."""

    jobs: Annotated[tuple[JobRow, ...], msgspec.Meta(max_length=MAX_ROWS)] = ()


class JobAccepted(ApiResponse, frozen=True, kw_only=True):
    """A long operation was accepted; follow it with ``GetJobRequest``."""

    job_id: Id
    vm_uuid: Uuid | None = None


class PlacementExplanation(ApiResponse, frozen=True, kw_only=True):
    """Response to ``ExplainPlacementRequest``: a verdict per host."""

    offering: Label
    requests: PciRequests = ()
    verdicts: Annotated[tuple[HostVerdict, ...], msgspec.Meta(max_length=MAX_ROWS)] = ()


class MigrationPlan(ApiResponse, frozen=True, kw_only=True):
    """Response to a dry-run ``MigrateVmRequest``: where and which devices."""

    vm_uuid: Uuid
    source_guid: Guid
    destination_guid: Guid
    devices: Annotated[tuple[DeviceMapping, ...], msgspec.Meta(max_length=MAX_DEVICES)] = ()


class MaintenancePlan(ApiResponse, frozen=True, kw_only=True):
    """Response to ``HostMaintenanceRequest``: what moves where, what stays and why."""

    host_guid: Guid
    host_name: Label
    status: HostStatus
    dry_run: bool = False
    moves: Annotated[tuple[MaintenanceMove, ...], msgspec.Meta(max_length=MAX_ROWS)] = ()
    holds: Annotated[tuple[MaintenanceHold, ...], msgspec.Meta(max_length=MAX_ROWS)] = ()
    #: VMs that cannot move now, each with why (no destination, a job in flight).
    problems: Annotated[tuple[Details, ...], msgspec.Meta(max_length=MAX_ROWS)] = ()
    #: The maintenance job that follows the host until it is in Maintenance.
    job_id: Id | None = None


class DeviceStateChanged(ApiResponse, frozen=True, kw_only=True):
    """Response to ``SetPciDeviceEnabledRequest``."""

    device: PciDeviceRow
