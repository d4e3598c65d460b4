"""Events published on ``hostdev.events`` for external tools (past tense)."""

from __future__ import annotations

from typing import ClassVar

from hostdev.messages.base import Message, PowerState
from hostdev.messages.limits import (
    DeviceName,
    DomainName,
    Guid,
    Id,
    LongDetails,
    Timestamp,
    Uuid,
    Word,
)
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import HostStatus, JobState, VmState


class Event(Message, frozen=True, kw_only=True):
    """Something that happened; ``at`` is an ISO 8601 UTC timestamp."""

    kind: ClassVar[str] = "event"

    at: Timestamp = ""


class VmStateChanged(Event, frozen=True, kw_only=True):
    """Routing key ``vm.<uuid>.<State>``."""

    vm_uuid: Uuid
    state: VmState
    previous: VmState | None = None
    host_guid: Guid | None = None


class HostStatusChanged(Event, frozen=True, kw_only=True):
    """Routing key ``host.<guid>.<Status>``."""

    host_guid: Guid
    status: HostStatus
    previous: HostStatus | None = None


class PciDeviceAllocated(Event, frozen=True, kw_only=True):
    """Routing key ``pci.<guid>.Allocated``."""

    host_guid: Guid
    address: PciAddress
    name: DeviceName
    vm_uuid: Uuid


class PciDeviceReleased(Event, frozen=True, kw_only=True):
    """Routing key ``pci.<guid>.Released``."""

    host_guid: Guid
    address: PciAddress
    name: DeviceName
    vm_uuid: Uuid


class JobFinished(Event, frozen=True, kw_only=True):
    """Routing key ``job.<id>.<Outcome>`` (``Succeeded`` or ``Failed``)."""

    job_id: Id
    job_kind: Word
    state: JobState
    vm_uuid: Uuid | None = None
    step: Word = ""
    details: LongDetails = ""


class ForeignDomainFound(Event, frozen=True, kw_only=True):
    """Routing key ``host.<guid>.ForeignDomain``: a host runs a domain management did not place.

    Management records it on the host and never adopts it; ``state`` is the
    domain's libvirt state as the host reported it.
    """

    host_guid: Guid
    vm_uuid: Uuid
    name: DomainName
    state: PowerState
