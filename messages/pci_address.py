"""PCI addresses: ``[domain:]bus:slot.function``, printed in the full form."""

from __future__ import annotations

import re
from typing import Any

from hostdev.messages.errors import PciAddressError

_SHAPE = re.compile(
    r"^(?:(?P<domain>[^:]+):)?(?P<bus>[^:]+):(?P<slot>[^.:]+)\.(?P<function>[^.:]+)$"
)
_HEX = re.compile(r"[0-9a-fA-F]+")  # used with fullmatch: no trailing newline slips through
_EXPECTED = "[domain:]bus:slot.function, e.g. 28:00.1 or 0000:28:00.1"

# (part, digits at most, largest value)
_LIMITS = {
    "domain": (4, 0xFFFF),
    "bus": (2, 0xFF),
    "slot": (2, 0x1F),
    "function": (1, 0x7),
}


def _part(name: str, text: str, whole: str) -> int:
    width, top = _LIMITS[name]
    if not _HEX.fullmatch(text) or len(text) > width:
        raise PciAddressError(
            f"PCI address {whole!r}: {name} {text!r} is not a hexadecimal number of at most "
            f"{width} digit{'s' if width > 1 else ''} (expected {_EXPECTED})"
        )
    value = int(text, 16)
    if value > top:
        raise PciAddressError(
            f"PCI address {whole!r}: {name} {text!r} is above the largest {name}, "
            f"{top:#x} (expected {_EXPECTED})"
        )
    return value


class PciAddress(str):
    """A validated PCI address; the string value is always ``dddd:bb:ss.f``.

    It is a ``str`` so messages carry it as plain JSON text, and equality,
    hashing and sorting follow the canonical form: ``28:00.1`` equals
    ``0000:28:00.1``.
    """

    __slots__ = ()

    domain: int
    bus: int
    slot: int
    function: int

    def __new__(cls, text: str) -> PciAddress:
        if isinstance(text, PciAddress):
            return text
        if not isinstance(text, str):
            raise PciAddressError(f"PCI address must be text, got {type(text).__name__}")
        stripped = text.strip()
        match = _SHAPE.match(stripped)
        if match is None:
            raise PciAddressError(f"PCI address {text!r} is malformed (expected {_EXPECTED})")
        domain = _part("domain", match["domain"], stripped) if match["domain"] else 0
        bus = _part("bus", match["bus"], stripped)
        slot = _part("slot", match["slot"], stripped)
        function = _part("function", match["function"], stripped)
        return super().__new__(cls, f"{domain:04x}:{bus:02x}:{slot:02x}.{function:x}")

    @classmethod
    def from_parts(cls, domain: int, bus: int, slot: int, function: int) -> PciAddress:
        """Builds an address from its numeric parts, checking each range."""
        return cls(f"{domain:x}:{bus:x}:{slot:x}.{function:x}")

    def __getattr__(self, name: str) -> Any:
        # Parts are derived from the canonical text rather than stored, so the
        # value stays a plain immutable str subclass with no per-instance dict.
        index = {"domain": 0, "bus": 1, "slot": 2, "function": 3}.get(name)
        if index is None:
            raise AttributeError(name)
        domain, bus, rest = str.split(self, ":")
        slot, function = rest.split(".")
        return int((domain, bus, slot, function)[index], 16)

    @property
    def libvirt_name(self) -> str:
        """The node-device name libvirt uses, ``pci_0000_28_00_1``."""
        return "pci_" + str.replace(str.replace(str(self), ":", "_"), ".", "_")

    @classmethod
    def from_libvirt_name(cls, name: str) -> PciAddress:
        """Parses a libvirt node-device name such as ``pci_0000_28_00_1``."""
        parts = name.removeprefix("pci_").split("_")
        if len(parts) != 4 or not name.startswith("pci_"):
            raise PciAddressError(f"{name!r} is not a libvirt PCI device name (pci_dddd_bb_ss_f)")
        return cls(f"{parts[0]}:{parts[1]}:{parts[2]}.{parts[3]}")

    def __repr__(self) -> str:
        return f"PciAddress({str(self)!r})"
