"""Parsing of an offering's PCI device list, as the original writes it.

``10GE,10GE`` asks for two 10GE devices; ``10GE:2`` is accepted as the same;
``10GE:2,GPU`` asks for two 10GE and one GPU. Pure functions over strings.
"""

from __future__ import annotations

from collections.abc import Iterable

from hostdev.messages.limits import DEVICE_NAME_PATTERN, MAX_COUNT
from hostdev.messages.values import PciRequest
from hostdev.mgmt.errors import InvalidRequest


def parse_pci_devices(text: str) -> tuple[PciRequest, ...]:
    """Parses ``10GE,10GE`` or ``10GE:2`` into requests, one per name, in order.

    An empty string means no devices.

    Raises:
        InvalidRequest: a part is empty, a name has a forbidden character, or a
            count is not a whole number from 1 to 64; the text names the part.
    """
    counts: dict[str, int] = {}
    if not text.strip():
        return ()
    for position, raw in enumerate(text.split(","), start=1):
        part = raw.strip()
        if not part:
            raise InvalidRequest(f"PCI device list {text!r}: part {position} is empty; "
                                 "write names separated by commas, e.g. 10GE,10GE or 10GE:2")
        name, sep, count_text = part.partition(":")
        name = name.strip()
        if not DEVICE_NAME_PATTERN.search(name):
            raise InvalidRequest(f"PCI device list {text!r}: {part!r} is not a device name; "
                                 "use 1 to 64 letters, digits, '_', '.' or '-' (e.g. 10GE)")
        count = 1
        if sep:
            count_text = count_text.strip()
            if not count_text.isdigit() or not 1 <= int(count_text) <= MAX_COUNT:
                raise InvalidRequest(f"PCI device list {text!r}: in {part!r} the count "
                                     f"{count_text!r} must be a whole number from 1 to "
                                     f"{MAX_COUNT}")
            count = int(count_text)
        counts[name] = counts.get(name, 0) + count
        if counts[name] > MAX_COUNT:
            raise InvalidRequest(f"PCI device list {text!r}: {counts[name]} x {name} is more "
                                 f"than the {MAX_COUNT} a VM may hold")
    return tuple(PciRequest(name=name, count=count) for name, count in counts.items())


def format_pci_requests(requests: Iterable[PciRequest]) -> str:
    """Writes requests back in the short form: ``10GE:2,GPU``."""
    return ",".join(r.name if r.count == 1 else f"{r.name}:{r.count}" for r in requests)


def describe_pci_requests(requests: Iterable[PciRequest]) -> str:
    """Writes requests for people: ``2 x 10GE and 1 x GPU``."""
    parts = [f"{r.count} x {r.name}" for r in requests]
    if not parts:
        return "no PCI devices"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def check_names_exist(requests: Iterable[PciRequest], known: Iterable[str]) -> None:
    """Refuses requests naming a device no host has, listing the names that exist.

    Raises:
        InvalidRequest: at least one requested name is unknown.
    """
    known_set = set(known)
    unknown = sorted({r.name for r in requests} - known_set)
    if unknown:
        existing = ", ".join(sorted(known_set)) if known_set else "none (no host reported any)"
        raise InvalidRequest(f"no host has a PCI device named {', '.join(unknown)}; "
                             f"names that exist: {existing}")
