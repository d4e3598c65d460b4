"""Template checks on upload: each refusal names the template, the line and what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostdev.mgmt.errors import InvalidRequest
from hostdev.mgmt.vms.template_checks import LIBVIRT_DOMAIN_SCHEMA, check_template
from tests.support.agent import example_template

BASE = """<domain type='kvm'>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <interface type='network'><source network='default'/><model type='virtio'/></interface>
  </devices>
</domain>"""


def _devices(*lines: str) -> str:
    """BASE with ``lines`` as its devices, from line 4 on."""
    return BASE.replace(
        "    <interface type='network'><source network='default'/><model type='virtio'/>"
        "</interface>", "\n".join(f"    {line}" for line in lines))


@pytest.mark.parametrize("name", ["debian-bond.xml", "kernel-boot.xml"])
def test_the_shipped_examples_pass(name: str) -> None:
    """The example templates of etc/templates are accepted as they are."""
    check_template(name, example_template(name))


def test_a_test_domain_for_simulated_hosts_passes() -> None:
    """Domain type test (the libvirt test driver) is allowed."""
    check_template("sim", BASE.replace("type='kvm'", "type='test'"))


REFUSALS = [
    ("not well-formed", "<domain type='kvm'>\n  <os>\n</domain>",
     "template t line 3: not well-formed XML"),
    ("root", "<network/>", "template t line 1: the root element is <network>"),
    ("doctype", '<!DOCTYPE domain [<!ENTITY a "aaaa">]>\n' + BASE,
     "template t line 1: a <!DOCTYPE> is not allowed in a template"),
    ("type", BASE.replace("'kvm'", "'xen'"),
     "template t line 1: domain type 'xen' is not allowed; use one of kvm, qemu, test"),
    ("name", BASE.replace("  <os>", "  <name>fixed</name>\n  <os>"),
     "template t line 2: <name> is set by hostdev"),
    ("uuid", BASE.replace("  <os>", "  <uuid>0</uuid>\n  <os>"),
     "template t line 2: <uuid> is set by hostdev"),
    ("memory", BASE.replace("  <os>", "  <memory>1</memory>\n  <os>"),
     "template t line 2: <memory> is set by hostdev"),
    ("vcpu", BASE.replace("  <os>", "  <vcpu>2</vcpu>\n  <os>"),
     "template t line 2: <vcpu> is set by hostdev"),
    ("hostdev", _devices("<hostdev mode='subsystem' type='pci' managed='yes'/>"),
     "template t line 4: <hostdev> is hostdev's: it passes through the devices the "
     "offering asks for"),
    ("device", _devices("<smartcard mode='host'/>"),
     "template t line 4: device <smartcard> is not allowed in a template; allowed: "),
    ("interface type", _devices("<interface type='direct'><source dev='eth0'/></interface>"),
     "template t line 4: interface type 'direct' is not allowed"),
    ("interface source", _devices("<interface type='bridge'><model type='virtio'/></interface>"),
     "template t line 4: interface type 'bridge' needs <source bridge='...'/>"),
    ("file disk", _devices("<disk type='file' device='disk'><source file='/x.img'/>"
                           "<target dev='vda'/></disk>"),
     "template t line 4: a writable disk of type 'file' would be written by every VM"),
    ("volume source", _devices("<disk type='volume' device='disk'><source pool='p'/>"
                               "<target dev='vda'/></disk>"),
     "template t line 4: a volume disk needs <source pool='...' volume='...'/>"),
    ("volume target", _devices("<disk type='volume' device='disk'>"
                               "<source pool='p' volume='v'/></disk>"),
     "template t line 4: a volume disk needs <target dev='...'/>"),
    ("storage", BASE.replace("  <os>", "  <metadata><h:template xmlns:h='urn:hostdev:template:1'>"
                             "<h:storage shared='maybe'/></h:template></metadata>\n  <os>"),
     "template t line 2: storage shared='maybe'"),
]


@pytest.mark.parametrize(("case", "xml", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_each_rule_refuses_with_its_line(case: str, xml: str, message: str) -> None:
    """A template breaking one rule is refused with the line and the rule."""
    with pytest.raises(InvalidRequest) as caught:
        check_template("t", xml)
    assert str(caught.value).startswith(message), str(caught.value)


def test_libvirt_s_schema_names_the_refused_element_and_its_line() -> None:
    """An attribute libvirt does not know is refused on the line of its element."""
    assert LIBVIRT_DOMAIN_SCHEMA.exists(), "make setup installs libvirt0, which ships it"
    xml = _devices("<interface type='network'><source network='default'/>",
                   "  <model typo='virtio'/></interface>")
    with pytest.raises(InvalidRequest) as caught:
        check_template("t", xml)
    assert str(caught.value).startswith(
        "template t line 5: libvirt's domain schema does not accept <model typo='virtio'> "
        "there"), str(caught.value)


def test_without_libvirt_s_schema_only_hostdev_s_rules_apply(tmp_path: Path) -> None:
    """A host without the schema file still refuses by hostdev's own rules, no more."""
    absent = tmp_path / "domain.rng"
    check_template("t", _devices("<interface type='network'><source network='n'/>"
                                 "<model typo='virtio'/></interface>"), schema=absent)
    with pytest.raises(InvalidRequest, match="<vcpu> is set by hostdev"):
        check_template("t", BASE.replace("  <os>", "  <vcpu>2</vcpu>\n  <os>"), schema=absent)
