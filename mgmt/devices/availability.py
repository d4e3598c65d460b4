"""The hardware rules, pure: which devices of one host are kept from offer, and what a claim takes.

Over one host's device rows (``DeviceFacts``), in this order:

1. withheld: a device its agent withholds (an IOMMU group with a member not
   listed in ``pci.devices``) is unavailable, its reason the agent's;
2. PF and VF: a VF whose PF is held is unavailable, and so is a PF with a
   held VF; a device whose IOMMU group also holds its own PF or VF can never
   be given (one VM would get both) and is unavailable too;
3. IOMMU group: when any member of a group is held, disabled, or kept by
   rule 1 or 2, every other free member is unavailable.

"Held" is allocated, reserved, quarantined or cleaning; removed devices are
out of the inventory and count for nothing. A claim takes whole groups
(:func:`choose`), so by these rules every member of a free group is free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from hostdev.messages.limits import MAX_LABEL
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DeviceState
from hostdev.mgmt.devices.device_rows import (
    ALLOCATED,
    CLEANING,
    DISABLED,
    FREE,
    NO_NODE,
    QUARANTINED,
    REMOVED,
    RESERVED,
    UNAVAILABLE,
)

#: The states in which a VM has (or is about to have, or just had) the device.
HELD_STATES: Final[frozenset[DeviceState]] = frozenset({ALLOCATED, RESERVED, QUARANTINED,
                                                         CLEANING})
#: The states the rules choose between; every other state is decided by a VM or an operator.
RULED_STATES: Final[frozenset[DeviceState]] = frozenset({FREE, UNAVAILABLE})


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What the rules read of one device row.

    Attributes:
        holder: the name of the VM that holds or reserves it, "" when none.
    """

    id: int
    address: PciAddress
    name: str
    state: DeviceState
    iommu_group: int | None = None
    physical_function: PciAddress | None = None
    withheld: str = ""
    holder: str = ""
    reason: str = ""
    numa_node: int | None = None


@dataclass(frozen=True, slots=True)
class RuleChanges:
    """What makes a host's rows follow the rules: ids to make unavailable (with why), to free."""

    unavailable: dict[int, str] = field(default_factory=dict)
    free: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Choice:
    """The devices a claim takes, or the name it cannot meet (``short``: name, wanted, free)."""

    taken: tuple[DeviceFacts, ...] = ()
    short: tuple[str, int, int] | None = None


def _present(devices: Iterable[DeviceFacts]) -> list[DeviceFacts]:
    return [d for d in devices if d.state != REMOVED]


def _groups(devices: Sequence[DeviceFacts]) -> dict[int, list[DeviceFacts]]:
    groups: dict[int, list[DeviceFacts]] = {}
    for device in devices:
        if device.iommu_group is not None:
            groups.setdefault(device.iommu_group, []).append(device)
    return groups


def has_rules(devices: Iterable[DeviceFacts]) -> bool:
    """True when the rules can tie these devices together or keep one from offer.

    That is: one is withheld, two share an IOMMU group, or a listed device
    is the PF of another. Such a host's transitions serialize on its row.
    """
    present = _present(devices)
    addresses = {d.address for d in present}
    return (any(d.withheld for d in present)
            or any(len(members) > 1 for members in _groups(present).values())
            or any(d.physical_function in addresses for d in present))


def describe(device: DeviceFacts, own: Mapping[int, str] | None = None) -> str:
    """Says what keeps ``device`` from being given, as another device's reason quotes it."""
    holder = f" VM {device.holder}" if device.holder else " a VM"
    match device.state:
        case "allocated":
            return f"held by{holder}"
        case "reserved":
            return f"reserved for{holder}"
        case "quarantined":
            return f"quarantined for{holder}"
        case "cleaning":
            return "being cleaned after its VM"
        case "disabled":
            return "disabled" + (f" ({device.reason})" if device.reason else "")
    why = (own or {}).get(device.id, device.reason)
    return f"unavailable ({why})" if why else str(device.state)


def _clip(reason: str) -> str:
    return reason if len(reason) <= MAX_LABEL else reason[:MAX_LABEL - 3] + "..."


def _own_reasons(present: Sequence[DeviceFacts]) -> dict[int, str]:
    """Rules 1 and 2: each device kept by its own facts (withheld, its PF or VFs), and why."""
    by_address = {d.address: d for d in present}
    vfs: dict[PciAddress, list[DeviceFacts]] = {}
    for device in present:
        if device.physical_function in by_address:
            vfs.setdefault(device.physical_function, []).append(device)
    groups = _groups(present)
    own: dict[int, str] = {}
    for device in present:
        if device.withheld:
            own[device.id] = device.withheld
            continue
        pf = by_address.get(device.physical_function) if device.physical_function else None
        if pf is not None and pf.state in HELD_STATES:
            own[device.id] = f"its PF {pf.address} is {describe(pf)}"
            continue
        held_vfs = sorted((vf for vf in vfs.get(device.address, ()) if vf.state in HELD_STATES),
                          key=lambda vf: vf.address)
        if held_vfs:
            own[device.id] = f"its VF {held_vfs[0].address} is {describe(held_vfs[0])}"
            continue
        mates = groups.get(device.iommu_group, ()) if device.iommu_group is not None else ()
        kin = sorted((m for m in mates if m.address == device.physical_function
                      or m.physical_function == device.address), key=lambda m: m.address)
        if kin:
            own[device.id] = (f"IOMMU group {device.iommu_group} holds both a PF and its VF "
                              f"({kin[0].address}); they can never be given to one VM")
    return own


def blocked(devices: Iterable[DeviceFacts]) -> dict[int, str]:
    """Returns every device the rules keep from offer (whatever its state), with why."""
    present = _present(devices)
    own = _own_reasons(present)
    reasons = dict(own)
    for group, members in sorted(_groups(present).items()):
        blockers = sorted((m for m in members if m.state in HELD_STATES or m.state == DISABLED
                           or m.id in own), key=lambda m: m.address)
        for member in members:
            if member.id in reasons:
                continue
            others = [b for b in blockers if b.id != member.id]
            if others:
                reasons[member.id] = (f"IOMMU group {group}: {others[0].address} is "
                                      f"{describe(others[0], own)}")
    return {device_id: _clip(reason) for device_id, reason in reasons.items()}


def rule_changes(devices: Iterable[DeviceFacts]) -> RuleChanges:
    """Returns the changes that make the free and unavailable devices follow the rules."""
    present = _present(devices)
    reasons = blocked(present)
    unavailable = {d.id: reasons[d.id] for d in present if d.state in RULED_STATES
                   and d.id in reasons and (d.state != UNAVAILABLE or d.reason != reasons[d.id])}
    free = tuple(sorted(d.id for d in present if d.state == UNAVAILABLE and d.id not in reasons))
    return RuleChanges(unavailable=unavailable, free=free)


def group_of(device: DeviceFacts, present: Sequence[DeviceFacts]) -> list[DeviceFacts]:
    """Returns the devices a claim of ``device`` takes: its whole IOMMU group (listed members)."""
    if device.iommu_group is None:
        return [device]
    return sorted((d for d in present if d.iommu_group == device.iommu_group),
                  key=lambda d: d.id)


def _node(device: DeviceFacts) -> int:
    return NO_NODE if device.numa_node is None else device.numa_node


def _related(a: DeviceFacts, b: DeviceFacts) -> bool:
    return a.physical_function == b.address or b.physical_function == a.address


def choose(devices: Iterable[DeviceFacts], requests: Mapping[str, int],
           numa_node: int | None = None) -> Choice:
    """Picks the devices a claim of ``requests`` takes on one host, following the rules.

    With ``numa_node``, the requested devices are taken on that node only
    (``NO_NODE`` for devices without one); a group still goes whole, but
    members on another node do not count for their names.

    Names are served in sorted order, devices in id order (PFs that have
    listed VFs last, so a VF request does not spoil its PF's siblings). A
    device brings its whole IOMMU group, and the group's members count for
    their own names. A unit (a group) is skipped when any member is not free
    or is the PF or a VF of a device already taken. Placement counts free
    devices only, so one request that could be met only by a PF together
    with its own VF fits by count and is refused here (a final refusal:
    placement goes on to the next host).
    """
    present = _present(devices)
    pfs = {d.physical_function for d in present if d.physical_function is not None}

    def counts_for(device: DeviceFacts, name: str) -> bool:
        return device.name == name and (numa_node is None or _node(device) == numa_node)

    taken: dict[int, DeviceFacts] = {}
    for name, count in sorted(requests.items()):
        need = count - sum(1 for d in taken.values() if counts_for(d, name))
        candidates = sorted((d for d in present if counts_for(d, name) and d.state == FREE),
                            key=lambda d: (d.address in pfs, d.id))
        for candidate in candidates:
            if need <= 0:
                break
            if candidate.id in taken:
                continue
            unit = group_of(candidate, present)
            if any(m.state != FREE for m in unit) or any(
                    _related(m, t) for m in unit for t in (*taken.values(), *unit)):
                continue
            taken.update((m.id, m) for m in unit)
            need -= sum(1 for m in unit if counts_for(m, name))
        if need > 0:
            return Choice(short=(name, count, len(candidates)))
    return Choice(taken=tuple(sorted(taken.values(), key=lambda d: d.id)))
