"""PciAddress parses the short and full forms, prints the full one, and names the wrong part."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostdev.messages.errors import MessageError, PciAddressError
from hostdev.messages.pci_address import PciAddress
from tests.support.message_strategies import pci_addresses


def test_short_and_full_forms_are_equal() -> None:
    """``28:00.1`` and ``0000:28:00.1`` are the same address."""
    assert PciAddress("28:00.1") == PciAddress("0000:28:00.1")
    assert hash(PciAddress("28:00.1")) == hash(PciAddress("0000:28:00.1"))


def test_prints_the_full_form() -> None:
    """The string value is always ``dddd:bb:ss.f``, lower-case hex."""
    assert str(PciAddress("28:00.1")) == "0000:28:00.1"
    assert str(PciAddress("AB:1F.7")) == "0000:ab:1f.7"
    assert str(PciAddress("1:2:3.4")) == "0001:02:03.4"
    assert repr(PciAddress("28:00.1")) == "PciAddress('0000:28:00.1')"


def test_parts() -> None:
    """Domain, bus, slot and function are the numeric parts."""
    address = PciAddress("0001:28:1f.7")
    assert (address.domain, address.bus, address.slot, address.function) == (1, 0x28, 0x1F, 7)


@pytest.mark.parametrize(("text", "part", "why"), [
    ("28:00.8", "function '8'", "above the largest function, 0x7"),
    ("zz:00.0", "bus 'zz'", "not a hexadecimal number"),
    ("28:20.0", "slot '20'", "above the largest slot, 0x1f"),
    ("10000:28:00.0", "domain '10000'", "at most 4 digits"),
    ("128:00.0", "bus '128'", "at most 2 digits"),
    ("28:0g.0", "slot '0g'", "not a hexadecimal number"),
    ("28\n:28:00.1", "domain '28\\n'", "not a hexadecimal number"),
])
def test_rejects_naming_the_wrong_part(text: str, part: str, why: str) -> None:
    """An out-of-range or non-hex part raises PciAddressError naming that part and why."""
    with pytest.raises(PciAddressError) as caught:
        PciAddress(text)
    message = str(caught.value)
    assert part in message and why in message
    assert repr(text) in message
    assert "expected [domain:]bus:slot.function" in message


@pytest.mark.parametrize("text", ["", "28:00", "28.00.1", "0:0:0:0.0", "28:00.1.2", "pci_0"])
def test_rejects_wrong_shape(text: str) -> None:
    """A string without the ``[domain:]bus:slot.function`` shape is malformed."""
    with pytest.raises(PciAddressError, match="is malformed"):
        PciAddress(text)


def test_rejects_non_text() -> None:
    """Only strings are addresses."""
    with pytest.raises(PciAddressError, match="must be text"):
        PciAddress(0x28)  # type: ignore[arg-type]


def test_error_is_a_message_error_and_value_error() -> None:
    """PciAddressError is caught as MessageError and as ValueError."""
    assert issubclass(PciAddressError, MessageError)
    assert issubclass(PciAddressError, ValueError)


def test_libvirt_names() -> None:
    """The libvirt node-device name round-trips."""
    address = PciAddress("28:00.1")
    assert address.libvirt_name == "pci_0000_28_00_1"
    assert PciAddress.from_libvirt_name("pci_0000_28_00_1") == address
    with pytest.raises(PciAddressError, match="not a libvirt PCI device name"):
        PciAddress.from_libvirt_name("net_eth0")


def test_from_parts_checks_ranges() -> None:
    """Building from numbers applies the same limits as parsing."""
    assert PciAddress.from_parts(0, 0x28, 0, 1) == "0000:28:00.1"
    with pytest.raises(PciAddressError, match="slot"):
        PciAddress.from_parts(0, 0x28, 0x20, 0)


@given(pci_addresses())
def test_canonical_form_is_a_fixed_point(address: PciAddress) -> None:
    """Parsing the printed form gives the same address, and the parts rebuild it."""
    assert PciAddress(str(address)) == address
    assert PciAddress.from_parts(address.domain, address.bus, address.slot,
                                 address.function) == address
    assert PciAddress.from_libvirt_name(address.libvirt_name) == address


@given(st.text(alphabet="0123456789abcdefABCDEFxz:. \n-", max_size=16))
def test_any_text_parses_or_raises_pci_address_error(text: str) -> None:
    """Arbitrary text either parses to a canonical address or raises PciAddressError."""
    try:
        address = PciAddress(text)
    except PciAddressError:
        return
    assert len(address) == 12 and PciAddress(str(address)) == address
