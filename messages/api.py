"""API requests (any client to management) and their responses.

Requests are sent to ``api.<Type>`` with a ``reply_to``; long operations
answer ``JobAccepted`` at once and finish asynchronously (``job.<id>.*``
events, ``GetJobRequest``).
"""

from __future__ import annotations

from typing import ClassVar

from hostdev.messages.base import Answer, Message
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import (
    DeviceMapping,
    HostRow,
    HostVerdict,
    JobRow,
    MigrationPolicy,
    OfferingRow,
    PciDeviceRow,
    PciRequest,
    VmRow,
)


class ApiRequest(Message, frozen=True, kw_only=True):
    """A request from any client; answered on its ``reply_to``."""

    kind: ClassVar[str] = "api"


# -- queries ------------------------------------------------------------------


class ListHostsRequest(ApiRequest, frozen=True, kw_only=True):
    """List hosts with status and device counts."""


class ListPciDevicesRequest(ApiRequest, frozen=True, kw_only=True):
    """List passthrough devices, optionally of one host or only free ones."""

    host: str | None = None
    free_only: bool = False


class ListVmsRequest(ApiRequest, frozen=True, kw_only=True):
    """List VMs."""


class ListOfferingsRequest(ApiRequest, frozen=True, kw_only=True):
    """List service offerings."""


class ListJobsRequest(ApiRequest, frozen=True, kw_only=True):
    """List recent jobs."""

    limit: int = 50


class GetJobRequest(ApiRequest, frozen=True, kw_only=True):
    """One job by id."""

    job_id: int


class ExplainPlacementRequest(ApiRequest, frozen=True, kw_only=True):
    """Why each host would be accepted or rejected for an offering."""

    offering: str
    avoid: tuple[str, ...] = ()


# -- changes ------------------------------------------------------------------


class CreateOfferingRequest(ApiRequest, frozen=True, kw_only=True):
    """Create a service offering; ``pci_devices`` as in the original: ``10GE,10GE``."""

    name: str
    cpus: int = 1
    memory_mb: int = 512
    pci_devices: str = ""
    migration_policy: MigrationPolicy | None = None


class DeployVmRequest(ApiRequest, frozen=True, kw_only=True):
    """Create a VM from an offering, place it and start it (a job)."""

    name: str
    offering: str
    avoid: tuple[str, ...] = ()


class StartVmRequest(ApiRequest, frozen=True, kw_only=True):
    """Start a stopped VM (a job)."""

    vm: str


class StopVmRequest(ApiRequest, frozen=True, kw_only=True):
    """Stop a running VM (a job)."""

    vm: str
    force: bool = False


class DestroyVmRequest(ApiRequest, frozen=True, kw_only=True):
    """Stop if needed and remove a VM, releasing its devices (a job)."""

    vm: str


class MigrateVmRequest(ApiRequest, frozen=True, kw_only=True):
    """Live-migrate a VM (a job), to ``destination`` or wherever placement finds."""

    vm: str
    destination: str | None = None
    dry_run: bool = False


class AttachVmDevicesRequest(ApiRequest, frozen=True, kw_only=True):
    """Retry attaching the devices a VM holds but does not have (a job)."""

    vm: str


class SetPciDeviceEnabledRequest(ApiRequest, frozen=True, kw_only=True):
    """Disable a device (never offered again) or enable it back."""

    host: str
    address: PciAddress
    enabled: bool


# -- responses ----------------------------------------------------------------


class ApiResponse(Answer, frozen=True, kw_only=True):
    """A response to an API request; errors are ``ErrorAnswer``."""


class HostList(ApiResponse, frozen=True, kw_only=True):
    """Response to ``ListHostsRequest``."""

    hosts: tuple[HostRow, ...] = ()


class PciDeviceList(ApiResponse, frozen=True, kw_only=True):
    """Response to ``ListPciDevicesRequest``."""

    devices: tuple[PciDeviceRow, ...] = ()


class VmList(ApiResponse, frozen=True, kw_only=True):
    """Response to ``ListVmsRequest``."""

    vms: tuple[VmRow, ...] = ()


class OfferingList(ApiResponse, frozen=True, kw_only=True):
    """Response to ``ListOfferingsRequest`` and ``CreateOfferingRequest``."""

    offerings: tuple[OfferingRow, ...] = ()


class JobList(ApiResponse, frozen=True, kw_only=True):
    """Response to ``ListJobsRequest`` and ``GetJobRequest``."""

    jobs: tuple[JobRow, ...] = ()


class JobAccepted(ApiResponse, frozen=True, kw_only=True):
    """A long operation was accepted; follow it with ``GetJobRequest``."""

    job_id: int
    vm_uuid: str | None = None


class PlacementExplanation(ApiResponse, frozen=True, kw_only=True):
    """Response to ``ExplainPlacementRequest``: a verdict per host."""

    offering: str
    requests: tuple[PciRequest, ...] = ()
    verdicts: tuple[HostVerdict, ...] = ()


class MigrationPlan(ApiResponse, frozen=True, kw_only=True):
    """Response to a dry-run ``MigrateVmRequest``: where and which devices."""

    vm_uuid: str
    source_guid: str
    destination_guid: str
    devices: tuple[DeviceMapping, ...] = ()


class DeviceStateChanged(ApiResponse, frozen=True, kw_only=True):
    """Response to ``SetPciDeviceEnabledRequest``."""

    device: PciDeviceRow
