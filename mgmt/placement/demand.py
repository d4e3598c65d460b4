"""What a VM asks of a host, the fit rule placement holds it to, and a host found for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from hostdev.messages.values import HostStatus, NumaPolicy, PciRequest
from hostdev.mgmt.persistence.models import HOST_UP

#: The one host status placement offers; a host in any other is refused.
PLACEABLE: Final[HostStatus] = HOST_UP

# The fit rule, criterion by criterion. A host fits a demand when:
#   1. it is in neither the avoid set's guids nor its names,
#   2. its status is PLACEABLE,
#   3. its CPUs minus those of its VMs in HOLDS_DEVICES states (``hosts.used_cpus``,
#      kept by ``hostdev.mgmt.vms.capacity``) cover the demand's,
#   4. so does its memory (``hosts.used_memory_mb``),
#   5. it has at least ``count`` FREE devices of every requested name,
#   6. with NUMA policy ``required``, one NUMA node (a NULL node counts as
#      NO_NODE) has them all: ``count`` FREE devices of every requested name.
# ``search._fit_conditions`` says it in SQL for the search, ``planner.shortfalls``
# in Python for verdicts and refusals; a property test holds the two to the
# same answers. The hardware rules (IOMMU groups, PF/VF, withheld devices)
# need no criterion of their own: a device they keep from offer is
# ``unavailable``, never FREE (``hostdev.mgmt.devices.availability``);
# verdicts say how many and why.


@dataclass(frozen=True)
class Demand:
    """What a VM needs from a host."""

    cpus: int
    memory_mb: int
    pci: tuple[PciRequest, ...] = ()
    #: ``required``: every device on one NUMA node of the host, or the host is refused.
    numa: NumaPolicy = "none"


@dataclass(frozen=True)
class Candidate:
    """A host the search found; the caller claims on it."""

    id: int
    guid: str
    name: str
