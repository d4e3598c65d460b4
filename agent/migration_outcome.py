"""Where a domain is after libvirt reported its migration failed.

Libvirt can fail a migration after the hand-over (in its finish or confirm
phase, or when the connection to the destination drops at the end): the
domain then runs on the destination although the call raised. Re-attaching
its devices on the source would leave them on a definition that no longer
runs here, so the agent looks first.
"""

from __future__ import annotations

from hostdev.agent.errors import HypervisorError
from hostdev.agent.hypervisor import Hypervisor


def landed_elsewhere(hypervisor: Hypervisor, uuid: str, destination_uri: str) -> bool:
    """After a migration error: whether the domain left this host for the destination.

    True when it no longer runs here and the destination has it; a shut-off
    definition left here is then removed, as ``UNDEFINE_SOURCE`` would have.
    False when it still runs (or is paused) here, or the destination cannot
    be asked.
    """
    here = hypervisor.domain(uuid)
    try:
        if (here is not None and here.state in ("running", "paused")) \
                or not hypervisor.has_domain_at(destination_uri, uuid):
            return False
        if here is not None:
            hypervisor.undefine(uuid)
    except HypervisorError:
        return False  # not known to be there: treated as not moved
    return True
