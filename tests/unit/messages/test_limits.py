"""Each named limit of ``hostdev.messages.limits`` at its boundary, through ``decode``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostdev.messages import api, commands
from hostdev.messages.codec import decode
from hostdev.messages.errors import InvalidFieldError
from hostdev.messages.limits import (
    MAX_AVOID,
    MAX_CPUS,
    MAX_DETAILS,
    MAX_DEVICES,
    MAX_DOMAINS,
    MAX_INT64,
    MAX_JOBS_LISTED,
    MAX_MEMORY_MB,
    MAX_SECONDS,
    NAME_PATTERN,
    clip,
)

UUID = "44444444-0000-0000-0000-000000000001"
DOMAIN = {"uuid": UUID, "name": "d", "state": "running"}


def body(type_: str, **fields: Any) -> str:
    return json.dumps({"type": type_, **fields})


def refusal(raw: str) -> str:
    with pytest.raises(InvalidFieldError) as caught:
        decode(raw)
    return str(caught.value)


# (case, message type, other required fields, field, largest value, one too many, words)
STRINGS = [
    ("guid", "PingRoutingCommand", {}, "guid", "g" * 64, "g" * 65, "at most 64"),
    ("host name", "StartupRoutingCommand", {"guid": "g", "cpus": 1, "memory_mb": 1},
     "name", "h" * 255, "h" * 256, "at most 255"),
    ("vm name", "DeployVmRequest", {"offering": "o"}, "name", "v" * 64, "v" * 65,
     "at most 64"),
    ("offering name", "CreateOfferingRequest", {}, "name", "o" * 64, "o" * 65, "at most 64"),
    ("uuid", "StopCommand", {}, "vm_uuid", "u" * 36, "u" * 37, "at most 36"),
    ("reference", "StartVmRequest", {}, "vm", "r" * 255, "r" * 256, "at most 255"),
    ("details", "StopAnswer", {"vm_uuid": "u"}, "details", "d" * MAX_DETAILS,
     "d" * (MAX_DETAILS + 1), f"at most {MAX_DETAILS}"),
    ("uri", "StartupRoutingCommand", {"guid": "g", "name": "h", "cpus": 1, "memory_mb": 1},
     "migration_uri", "q" * 1024, "q" * 1025, "at most 1024"),
    ("version", "StartupRoutingCommand", {"guid": "g", "name": "h", "cpus": 1, "memory_mb": 1},
     "agent_version", "1" * 64, "1" * 65, "at most 64"),
    ("word", "ErrorAnswer", {}, "code", "c" * 64, "c" * 65, "at most 64"),
    ("pci device text", "CreateOfferingRequest", {"name": "o"}, "pci_devices",
     "a" * MAX_DETAILS, "a" * (MAX_DETAILS + 1), f"at most {MAX_DETAILS}"),
]


@pytest.mark.parametrize(("case", "type_", "others", "field", "largest", "over", "words"),
                         STRINGS, ids=[case[0] for case in STRINGS])
def test_string_limit_accepts_its_largest_and_refuses_one_more(
        case: str, type_: str, others: dict[str, Any], field: str, largest: str, over: str,
        words: str) -> None:
    """The longest value decodes; one character more is refused naming field and limit."""
    message = decode(body(type_, **others, **{field: largest}))
    assert getattr(message, field) == largest
    text = refusal(body(type_, **others, **{field: over}))
    assert f"{type_} at $.{field}: `{field}` is {len(over)} characters long; {words}" in text


# (message type, other required fields, field, smallest, largest)
NUMBERS = [
    ("CreateOfferingRequest", {"name": "o"}, "cpus", 1, MAX_CPUS),
    ("CreateOfferingRequest", {"name": "o"}, "memory_mb", 1, MAX_MEMORY_MB),
    ("ListJobsRequest", {}, "limit", 1, MAX_JOBS_LISTED),
    ("GetJobRequest", {}, "job_id", 0, MAX_INT64),
    ("StopCommand", {"vm_uuid": "u"}, "timeout_s", 0.0, MAX_SECONDS),
]


@pytest.mark.parametrize(("type_", "others", "field", "smallest", "largest"), NUMBERS,
                         ids=[f"{case[0]}.{case[2]}" for case in NUMBERS])
def test_number_limit_accepts_its_range_and_refuses_beyond(
        type_: str, others: dict[str, Any], field: str, smallest: float, largest: float) -> None:
    """Both ends of the range decode; one beyond either end is refused with the bound."""
    for value in (smallest, largest):
        assert getattr(decode(body(type_, **others, **{field: value})), field) == value
    step = 1 if isinstance(largest, int) else 0.5
    over = refusal(body(type_, **others, **{field: largest + step}))
    assert f"$.{field}: `{field}` is {largest + step}; at most {largest}" in over
    under = refusal(body(type_, **others, **{field: smallest - step}))
    assert f"$.{field}: `{field}` is {smallest - step}; at least {smallest}" in under


def test_a_number_too_large_for_any_column_is_refused() -> None:
    """The CLI's 99999999999999999999 CPUs is refused at decode, not by the database."""
    text = refusal('{"type": "CreateOfferingRequest", "name": "o", "cpus": 99999999999999999999}')
    assert "`cpus` is 99999999999999999999; at most 65536" in text


# (message type, other required fields, field, item, limit)
LISTS = [
    ("PingRoutingCommand", {"guid": "g"}, "domains", DOMAIN, MAX_DOMAINS),
    ("StartAnswer", {"vm_uuid": "u"}, "hostdevs", "0000:28:00.1", MAX_DEVICES),
    ("DeployVmRequest", {"name": "v", "offering": "o"}, "avoid", "h", MAX_AVOID),
    ("StartupRoutingCommand", {"guid": "g", "name": "h", "cpus": 1, "memory_mb": 1},
     "pci_devices", {"address": "28:00.1", "name": "n"}, MAX_DEVICES),
]


@pytest.mark.parametrize(("type_", "others", "field", "item", "limit"), LISTS,
                         ids=[f"{case[0]}.{case[2]}" for case in LISTS])
def test_list_limit_accepts_its_largest_and_refuses_one_more(
        type_: str, others: dict[str, Any], field: str, item: Any, limit: int) -> None:
    """The longest list decodes; one item more is refused naming field and size."""
    message = decode(body(type_, **others, **{field: [item] * limit}))
    assert len(getattr(message, field)) == limit
    text = refusal(body(type_, **others, **{field: [item] * (limit + 1)}))
    assert f"$.{field}: `{field}` has {limit + 1} items; at most {limit}" in text


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", fullmatch=True))
def test_every_name_of_the_rule_is_an_offering_name(name: str) -> None:
    """Offering names follow the VM name rule: any name it allows decodes."""
    message = decode(body("CreateOfferingRequest", name=name))
    assert isinstance(message, api.CreateOfferingRequest) and message.name == name


@pytest.mark.parametrize("name", ["a\x00b", "it's", 'say"hi"', "my vm", "-lead", "", "a\n",
                                  "tab\there", "é"])
def test_offering_names_outside_the_rule_are_refused(name: str) -> None:
    """NUL, quotes, spaces, a leading '-', an empty name or a final newline are refused."""
    text = refusal(body("CreateOfferingRequest", name=name))
    assert "CreateOfferingRequest at $.name: `name`" in text
    assert "starting with a letter or digit" in text
    assert NAME_PATTERN.search(name) is None


def test_control_characters_are_refused_in_a_reference() -> None:
    """A reference (name, guid or uuid of something) may not carry control characters."""
    text = refusal(body("StopVmRequest", vm="vm\x1b[2J"))
    assert "StopVmRequest at $.vm: `vm` \"vm\\u001b[2J\" has a character or form" in text


def test_a_huge_pci_address_is_refused_without_echoing_it() -> None:
    """A 1 MB PCI address is refused with its length, not its text."""
    raw = body("StartAnswer", vm_uuid="u", hostdevs=["1" * 1048576])
    text = refusal(raw)
    assert "at most 32 characters" in text and len(text) < 500


def test_a_huge_value_is_cut_in_the_reason() -> None:
    """A value shown in a reason is cut to 40 characters."""
    text = refusal(body("DeployVmRequest", name="x" * 30 + " " + "y" * 30, offering="o"))
    assert '"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx yyyyy...' in text


def test_a_valid_startup_still_decodes() -> None:
    """A full StartupRoutingCommand as an agent sends it is within every limit."""
    message = decode(body(
        "StartupRoutingCommand", guid="3f0c1d2e-0000-4000-8000-000000000001", name="kvm-01",
        hypervisor_version="9.0.0", cpus=64, memory_mb=262144,
        pci_devices=[{"address": "0000:28:00.1", "name": "10GE", "vendor_id": "0x8086",
                      "product_id": "0x1572", "iommu_group": 41}],
        domains=[{**DOMAIN, "hostdevs": ["28:00.1"]}], agent_version="0.1.0",
        migration_uri="qemu+tcp://kvm-01/system"))
    assert isinstance(message, commands.StartupRoutingCommand)


def test_clip_keeps_short_text_and_marks_a_cut() -> None:
    """Text within the limit is unchanged; longer text is cut to the limit and marked."""
    assert clip("short") == "short"
    cut = clip("z" * (MAX_DETAILS + 10))
    assert len(cut) == MAX_DETAILS and cut.endswith(" [cut]")
