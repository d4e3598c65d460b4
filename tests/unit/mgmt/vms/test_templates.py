"""Domain templates through management's API on SQLite: versions, offerings, rendering."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from hostdev.messages import api
from hostdev.messages.commands import ErrorAnswer, StartCommand
from hostdev.messages.values import TemplateRow
from hostdev.mgmt.persistence.models import VmInstance
from tests.support.agent import example_template
from tests.support.mgmt_harness import Harness, devices

BOND = example_template("debian-bond.xml")
KERNEL = example_template("kernel-boot.xml")


@pytest.fixture
def harness(engine: Engine) -> Harness:
    harness = Harness(engine)
    harness.register("g1", "h1", devices(4))
    return harness


def _templates(answer: object) -> tuple[TemplateRow, ...]:
    assert isinstance(answer, api.TemplateList), answer
    return answer.templates


def _error(answer: object) -> str:
    assert isinstance(answer, ErrorAnswer), answer
    return answer.details


def test_uploading_again_makes_a_new_version(harness: Harness) -> None:
    """The first upload is version 1, the next of the same name version 2."""
    first = _templates(harness.api(api.CreateTemplateRequest(name="bond", xml=BOND)))
    second = _templates(harness.api(api.CreateTemplateRequest(name="bond", xml=KERNEL)))
    assert (first[0].version, second[0].version) == (1, 2)


def test_list_shows_each_template_at_its_newest_version(harness: Harness) -> None:
    """Two templates, one uploaded twice: each listed once, newest, without its XML."""
    for name, xml in (("bond", BOND), ("bond", BOND), ("kernel", KERNEL)):
        harness.api(api.CreateTemplateRequest(name=name, xml=xml))
    rows = _templates(harness.api(api.ListTemplatesRequest()))
    assert [(r.name, r.version, r.xml) for r in rows] == [("bond", 2, ""), ("kernel", 1, "")]


def test_show_returns_a_version_s_xml(harness: Harness) -> None:
    """Show gives the newest XML, or the version asked for."""
    harness.api(api.CreateTemplateRequest(name="t", xml=BOND))
    harness.api(api.CreateTemplateRequest(name="t", xml=KERNEL))
    assert _templates(harness.api(api.ShowTemplateRequest(name="t")))[0].xml == KERNEL
    assert _templates(harness.api(api.ShowTemplateRequest(name="t", version=1)))[0].xml == BOND
    assert _error(harness.api(api.ShowTemplateRequest(name="t", version=7))) == (
        "template t has no version 7; versions: 1, 2")


def test_a_refused_upload_stores_nothing(harness: Harness) -> None:
    """A template fixing its memory is refused with its line; no version is made."""
    bad = BOND.replace("  <os>", "  <memory>1024</memory>\n  <os>")
    assert _error(harness.api(api.CreateTemplateRequest(name="t", xml=bad))).startswith(
        "template t line 12: <memory> is set by hostdev")
    assert _templates(harness.api(api.ListTemplatesRequest())) == ()


def test_an_offering_naming_no_such_template_is_refused(harness: Harness) -> None:
    """The refusal lists the templates that exist."""
    harness.api(api.CreateTemplateRequest(name="bond", xml=BOND))
    details = _error(harness.api(api.CreateOfferingRequest(name="o", template="nope")))
    assert details.startswith("no template is named 'nope'; templates: bond")


def test_delete_is_refused_while_an_offering_uses_the_template(harness: Harness) -> None:
    """The refusal names the offerings; a template no offering names is deleted."""
    harness.api(api.CreateTemplateRequest(name="bond", xml=BOND))
    for name in ("web", "db"):
        harness.api(api.CreateOfferingRequest(name=name, template="bond", pci_devices="10GE"))
    details = _error(harness.api(api.DeleteTemplateRequest(name="bond")))
    assert details == ("template bond is used by offering(s) db, web; it can be deleted once "
                       "no offering names it")
    harness.api(api.CreateTemplateRequest(name="spare", xml=KERNEL))
    assert _templates(harness.api(api.DeleteTemplateRequest(name="spare")))[0].name == "spare"
    assert [r.name for r in _templates(harness.api(api.ListTemplatesRequest()))] == ["bond"]


def test_deploy_sends_the_rendered_template_and_records_its_version(harness: Harness,
                                                                    engine: Engine) -> None:
    """The StartCommand carries the template filled in; the VM keeps version and console."""
    harness.api(api.CreateTemplateRequest(name="bond", xml=BOND))
    harness.api(api.CreateOfferingRequest(name="web", template="bond", cpus=2, memory_mb=1024,
                                          pci_devices="10GE"))
    accepted = harness.api(api.DeployVmRequest(name="vm1", offering="web"))
    assert isinstance(accepted, api.JobAccepted)
    command = harness.commands(StartCommand)[0].message
    assert isinstance(command, StartCommand)
    root = ET.fromstring(command.domain_xml)
    assert [root.findtext(t) for t in ("name", "uuid", "memory", "vcpu")] == [
        "vm1", accepted.vm_uuid, "1024", "2"]
    assert len(root.findall("./devices/hostdev")) == 1
    assert root.find("./devices/disk/source").get("volume") == "debian-12.qcow2"  # type: ignore[union-attr]
    console = f"/var/log/hostdev/console/{accepted.vm_uuid}.console.log"
    assert root.find("./devices/serial/source").get("path") == console  # type: ignore[union-attr]
    with Session(engine) as session:
        vm = session.scalars(select(VmInstance)).one()
        assert (vm.template_version, vm.console_path) == (1, console)
    rows = harness.api(api.ListVmsRequest())
    assert isinstance(rows, api.VmList)
    assert (rows.vms[0].template, rows.vms[0].template_version,
            rows.vms[0].console_path) == ("bond", 1, console)


def test_a_vm_restarts_from_the_version_it_was_built_from(harness: Harness) -> None:
    """A newer upload does not change an existing VM: its next start renders version 1."""
    harness.api(api.CreateTemplateRequest(name="bond", xml=BOND))
    harness.api(api.CreateOfferingRequest(name="web", template="bond", pci_devices="10GE"))
    harness.api(api.DeployVmRequest(name="vm1", offering="web"))
    harness.answer()
    harness.api(api.CreateTemplateRequest(name="bond", xml=KERNEL))
    harness.api(api.StopVmRequest(vm="vm1"))
    harness.answer()
    harness.api(api.StartVmRequest(vm="vm1"))
    command = harness.commands(StartCommand)[0].message
    assert isinstance(command, StartCommand)
    assert ET.fromstring(command.domain_xml).find("./devices/disk") is not None  # BOND's disk


def test_an_offering_without_template_sends_no_domain(harness: Harness) -> None:
    """Without a template the StartCommand leaves domain_xml empty: the minimal domain."""
    harness.api(api.CreateOfferingRequest(name="plain", pci_devices="10GE"))
    harness.api(api.DeployVmRequest(name="vm1", offering="plain"))
    command = harness.commands(StartCommand)[0].message
    assert isinstance(command, StartCommand) and command.domain_xml == ""
