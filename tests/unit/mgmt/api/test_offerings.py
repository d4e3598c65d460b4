"""Tests of the offering PCI device list syntax."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostdev.messages.values import PciRequest
from hostdev.mgmt.api.offerings import (
    check_names_exist,
    describe_pci_requests,
    format_pci_requests,
    parse_pci_devices,
)
from hostdev.mgmt.errors import InvalidRequest


def test_repeated_name_means_several() -> None:
    """`10GE,10GE` asks for two 10GE devices."""
    assert parse_pci_devices("10GE,10GE") == (PciRequest(name="10GE", count=2),)


def test_count_suffix_is_accepted() -> None:
    """`10GE:2` is the same as `10GE,10GE`; names keep first-seen order."""
    assert parse_pci_devices(" 10GE:2 , GPU") == (
        PciRequest(name="10GE", count=2), PciRequest(name="GPU", count=1))


def test_empty_means_none() -> None:
    """An empty list asks for no devices."""
    assert parse_pci_devices("") == ()


@pytest.mark.parametrize(("text", "message"), [
    ("10GE,,GPU", "part 2 is empty"),
    ("10GE|x", "'10GE|x' is not a device name"),
    ("10GE:two", "the count 'two' must be a whole number"),
    ("10GE:0", "the count '0'"),
    ("10GE:40,10GE:40", "80 x 10GE is more than"),
])
def test_errors_name_the_bad_part(text: str, message: str) -> None:
    """Each malformed list is refused with a message naming the bad part."""
    with pytest.raises(InvalidRequest, match=message):
        parse_pci_devices(text)


@given(st.dictionaries(st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,6}", fullmatch=True),
                       st.integers(1, 9), max_size=4))
def test_format_round_trips(counts: dict[str, int]) -> None:
    """Formatting then parsing gives the same requests back."""
    requests = tuple(PciRequest(name=n, count=c) for n, c in counts.items())
    assert parse_pci_devices(format_pci_requests(requests)) == requests


def test_describe_for_people() -> None:
    """Requests read as `2 x 10GE and 1 x GPU`."""
    assert describe_pci_requests(parse_pci_devices("10GE:2,GPU")) == "2 x 10GE and 1 x GPU"


def test_unknown_name_lists_existing() -> None:
    """A name no host has is refused, listing the names that exist."""
    with pytest.raises(InvalidRequest, match="named 40GE; names that exist: 10GE, GPU"):
        check_names_exist(parse_pci_devices("40GE"), ["GPU", "10GE"])
