"""Pure decisions of a live migration with PCI devices: policy, device mapping, outcomes.

Functions over plain values (no I/O), so the rules are tested without a
database: whether a policy lets a VM move, which destination device stands
in for which source device, and what an agent's answers mean for the job.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DeviceMapping, DeviceOutcome, MigrationPolicy
from hostdev.mgmt.devices.device_rows import HeldDevice
from hostdev.mgmt.errors import Forbidden

#: Steps of a migrate job, in order; ``verify`` and ``reattach`` only on trouble.
STEP_MIGRATE = "migrate"
STEP_VERIFY = "verify"
STEP_ATTACH = "attach"
STEP_REATTACH = "reattach"


def check_policy(vm_name: str, offering: str, policy: MigrationPolicy | str,
                 held: Sequence[HeldDevice]) -> None:
    """Refuses to migrate a VM holding devices when its offering's policy is ``forbid``.

    Raises:
        Forbidden: the VM holds devices and the policy is ``forbid``; the text
            names the devices, the offering and the policy, and what to do.
    """
    if not held or policy != "forbid":
        return
    devices = ", ".join(f"{d.address} ({d.name})" for d in held)
    raise Forbidden(
        f"VM {vm_name} holds PCI devices {devices} and its offering {offering!r} has "
        "migration policy 'forbid': a VM holding devices does not migrate. Stop it and "
        "start it on another host, or give it an offering with migration policy "
        "'detach-attach' (the guest loses the devices during the move)")


def pair_devices(source: Iterable[HeldDevice],
                 destination: Iterable[HeldDevice]) -> tuple[DeviceMapping, ...]:
    """Pairs each source device with a destination device of the same name, in order.

    Both sides are sorted by name then address, so the pairing is stable.
    A source device without a partner (too few of its name on the
    destination) is left out; the caller checked the counts before.
    """
    free: dict[str, list[PciAddress]] = {}
    for device in sorted(destination, key=lambda d: (d.name, str(d.address))):
        free.setdefault(device.name, []).append(device.address)
    pairs = []
    for device in sorted(source, key=lambda d: (d.name, str(d.address))):
        spare = free.get(device.name)
        if spare:
            pairs.append(DeviceMapping(name=device.name, source=device.address,
                                       destination=spare.pop(0)))
    return tuple(pairs)


def missing_after_rollback(detached: Sequence[PciAddress],
                           reattached: Sequence[PciAddress]) -> tuple[PciAddress, ...]:
    """Returns the devices an agent detached and could not put back."""
    back = set(reattached)
    return tuple(a for a in detached if a not in back)


def failed_attaches(addresses: Sequence[PciAddress], outcomes: Sequence[DeviceOutcome],
                    answer_ok: bool) -> tuple[tuple[PciAddress, str], ...]:
    """Returns (address, reason) of every device an attach answer did not attach.

    A device the answer does not mention counts as failed unless the whole
    answer is ``ok``.
    """
    by_address = {PciAddress(o.address): o for o in outcomes}
    failed = []
    for address in addresses:
        outcome = by_address.get(PciAddress(address))
        if outcome is None:
            if not answer_ok:
                failed.append((address, "not attached (the agent gave no outcome)"))
        elif outcome.result != "ok":
            failed.append((address, outcome.details or "attach failed"))
    return tuple(failed)


def describe_missing(failed: Sequence[tuple[PciAddress, str]]) -> str:
    """Writes ``0000:28:00.1 (reason), 0000:28:00.2 (reason)``."""
    return ", ".join(f"{address} ({reason})" for address, reason in failed)
