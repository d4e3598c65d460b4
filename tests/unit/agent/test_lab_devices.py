"""The lab option's stand-ins, and the domain XML of both paths against libvirt's schema."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from lxml import etree

from hostdev.agent.config import parse_config
from hostdev.agent.domain_xml import build_domain_xml, read_hostdevs, with_hostdev
from hostdev.agent.errors import ConfigError
from hostdev.agent.lab_devices import (
    StandIns,
    address_of_alias,
    alias_of,
    read_devices,
    read_stand_ins,
)
from hostdev.messages.domain_template import render_domain
from hostdev.messages.pci_address import PciAddress as P
from hostdev.messages.values import VmSpec
from hostdev.mgmt.vms.template_checks import LIBVIRT_DOMAIN_SCHEMA

TEMPLATES = Path(__file__).parents[3] / "etc" / "templates"
SPEC = VmSpec(uuid="33333333-0000-0000-0000-000000000001", name="vm1", cpus=1, memory_mb=128,
              pci_devices=(P("28:00.1"), P("28:00.2")))
STAND_INS = StandIns.for_addresses([P("28:00.2"), P("28:00.1"), P("3b:00.0")])


def _schema_errors(xml: str) -> str | None:
    """Returns libvirt's schema's complaint about a domain, None when it is valid."""
    assert LIBVIRT_DOMAIN_SCHEMA.exists(), (
        f"{LIBVIRT_DOMAIN_SCHEMA} is missing: `make setup` installs libvirt0, which ships it")
    schema = etree.RelaxNG(etree.parse(str(LIBVIRT_DOMAIN_SCHEMA)))
    if schema.validate(etree.fromstring(xml.encode())):
        return None
    return str(schema.error_log)


def test_the_production_domain_with_hostdevs_is_valid_for_libvirt() -> None:
    """The minimal domain with two managed PCI hostdevs passes libvirt's domain schema."""
    xml = build_domain_xml(SPEC)
    assert read_hostdevs(xml) == SPEC.pci_devices
    assert _schema_errors(xml) is None


def test_every_shipped_template_rendered_with_hostdevs_is_valid_for_libvirt() -> None:
    """Each template in etc/templates, rendered with two hostdevs, passes libvirt's schema."""
    templates = sorted(TEMPLATES.glob("*.xml"))
    assert templates
    for template in templates:
        xml = render_domain(template.read_text(encoding="utf-8"), SPEC)
        assert read_hostdevs(xml) == SPEC.pci_devices, template.name
        assert _schema_errors(xml) is None, template.name


def test_a_hot_plugged_hostdev_keeps_the_domain_valid_for_libvirt() -> None:
    """A domain given one more hostdev the way attach does stays valid for libvirt."""
    xml = with_hostdev(build_domain_xml(SPEC), P("5e:00.0"))
    assert _schema_errors(xml) is None


def test_stand_ins_sit_at_guest_slots_in_address_order() -> None:
    """The n-th configured address, in address order, sits at guest slot 0x10 + n."""
    assert [STAND_INS.guest_slot(a) for a in (P("28:00.1"), P("28:00.2"), P("3b:00.0"))] == [
        0x10, 0x11, 0x12]
    with pytest.raises(ValueError, match=r"not in pci\.devices"):
        STAND_INS.guest_slot(P("5e:00.0"))


def test_a_stand_in_is_an_e1000_named_and_addressed_for_its_device() -> None:
    """The stand-in is a user-mode e1000 with the device's alias, a MAC from it, and its slot."""
    element = ET.fromstring(STAND_INS.device_xml(P("28:00.2")))
    assert element.get("type") == "user"
    assert element.find("model").get("type") == "e1000"  # type: ignore[union-attr]
    assert element.find("alias").get("name") == "ua-hostdev-0000-28-00-2"  # type: ignore[union-attr]
    assert element.find("mac").get("address") == "52:54:00:28:00:02"  # type: ignore[union-attr]
    assert element.find("address").get("slot") == "0x11"  # type: ignore[union-attr]


def test_an_alias_names_its_address_and_no_other_alias_does() -> None:
    """alias_of and address_of_alias round-trip; a foreign alias names nothing."""
    assert address_of_alias(alias_of(P("1:3b:1f.7"))) == P("1:3b:1f.7")
    assert address_of_alias("net0") is None
    assert address_of_alias("ua-hostdev-zz") is None


def test_a_domain_with_stand_ins_holds_the_same_devices_and_is_valid() -> None:
    """Replacing the hostdevs by stand-ins keeps the devices a domain holds and libvirt's schema."""
    xml = STAND_INS.domain_with_stand_ins(build_domain_xml(SPEC, domain_type="qemu"))
    assert read_hostdevs(xml) == ()
    assert read_stand_ins(xml) == SPEC.pci_devices
    assert read_devices(xml) == SPEC.pci_devices
    assert _schema_errors(xml) is None


def test_a_hostdev_that_is_not_configured_is_left_as_it_is() -> None:
    """Only configured addresses get a stand-in; any other hostdev stays a hostdev."""
    spec = VmSpec(uuid=SPEC.uuid, name="vm1", cpus=1, memory_mb=128, pci_devices=(P("5e:00.0"),))
    xml = build_domain_xml(spec)
    assert STAND_INS.domain_with_stand_ins(xml) == xml


def test_more_stand_ins_than_guest_slots_are_refused() -> None:
    """Seventeen devices do not fit the sixteen guest slots; the error says so."""
    with pytest.raises(ValueError, match="at most 16"):
        StandIns.for_addresses(P(f"28:{n // 8:02x}.{n % 8}") for n in range(17))


def test_the_lab_option_is_off_unless_set_and_takes_yes_or_no() -> None:
    """lab.emulated.devices defaults to off, parses yes/no, and names the line of a bad value."""
    assert parse_config("").lab_emulated_devices is False
    assert parse_config("lab.emulated.devices=yes").lab_emulated_devices is True
    assert parse_config("lab.emulated.devices = no").lab_emulated_devices is False
    with pytest.raises(ConfigError, match=r"lab\.emulated\.devices must be yes or no"):
        parse_config("\nlab.emulated.devices=maybe", "agent.properties")


def test_more_devices_than_stand_ins_is_a_configuration_error() -> None:
    """With the lab option, a seventeenth pci.devices entry is refused naming its line."""
    entries = ",".join(f"28:{n // 8:02x}.{n % 8}|10GE" for n in range(17))
    with pytest.raises(ConfigError, match=r"agent\.properties:2: .*at most 16 devices"):
        parse_config(f"lab.emulated.devices=yes\npci.devices={entries}", "agent.properties")
    assert len(parse_config(f"pci.devices={entries}").pci_devices) == 17
