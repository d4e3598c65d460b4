"""Checks of a domain template on upload: each refusal names the line and what to do.

A template must be well-formed XML, a ``<domain>`` of an allowed type, with
only the devices a template may carry, none of the elements management owns
(``MANAGED_ELEMENTS``, any ``<hostdev>``), disks that are base images in a
storage pool (or read-only), NICs on a libvirt network or a bridge, and
valid against libvirt's own schema where the host has it
(``LIBVIRT_DOMAIN_SCHEMA``, shipped by Debian's ``libvirt0``).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Final

import structlog
from lxml import etree

from hostdev.messages.domain_template import MANAGED_ELEMENTS, TEMPLATE_NS
from hostdev.mgmt.errors import InvalidRequest

log = structlog.get_logger()

#: libvirt's RELAX NG schema of a domain, where libvirt is installed.
LIBVIRT_DOMAIN_SCHEMA: Final = Path("/usr/share/libvirt/schemas/domain.rng")
#: Domain types a template may have: ``test`` for simulated hosts.
DOMAIN_TYPES: Final = ("kvm", "qemu", "test")
#: The devices a template may carry; passthrough is management's (``<hostdev>``).
DEVICES: Final = ("emulator", "disk", "controller", "interface", "serial", "console",
                  "channel", "input", "graphics", "video", "sound", "memballoon", "rng",
                  "watchdog", "panic", "tpm", "filesystem")
#: The NICs a template may carry: on a libvirt network or a host bridge.
INTERFACE_TYPES: Final = ("network", "bridge")
_SEE: Final = "see https://libvirt.org/formatdomain.html"
#: Values standing in for what management fills, so libvirt's schema sees a whole domain.
_PLACEHOLDERS: Final = (("name", "template-check"),
                        ("uuid", "00000000-0000-0000-0000-000000000000"),
                        ("memory", "1"), ("vcpu", "1"))


def check_template(name: str, xml: str, schema: Path | None = LIBVIRT_DOMAIN_SCHEMA) -> None:
    """Refuses a template that hostdev could not fill or libvirt would not define.

    Args:
        name: the template's name, for the messages.
        xml: the template.
        schema: libvirt's domain schema; skipped when None or absent.

    Raises:
        InvalidRequest: the first problem found, as ``template NAME line N: ...``.
    """
    root = _parse(name, xml)
    if getattr(root.getroottree().docinfo, "doctype", ""):  # lxml-stubs lack doctype
        # Entities would be expanded by every later parse (rendering, the agent).
        raise InvalidRequest(f"template {name} line 1: a <!DOCTYPE> is not allowed in a "
                             "template; remove it")
    problem = _structure_problem(root) or _schema_problem(root, schema)
    if problem is not None:
        line, text = problem
        raise InvalidRequest(f"template {name} line {line}: {text}")


def _parse(name: str, xml: str) -> etree._Element:
    # No entities, no network: a template is data, never instructions to fetch.
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    try:
        return etree.fromstring(xml.encode("utf-8"), parser)
    except etree.XMLSyntaxError as exc:
        line = exc.lineno or 1
        raise InvalidRequest(f"template {name} line {line}: not well-formed XML "
                             f"({exc.msg}); fix the file and upload it again") from None


def _line(element: etree._Element) -> int:
    line: int | None = getattr(element, "sourceline", None)  # the stubs type it loosely
    return line or 1


def _structure_problem(root: etree._Element) -> tuple[int, str] | None:
    """Returns the line and text of the first rule the template breaks, or None."""
    if root.tag != "domain":
        return _line(root), f"the root element is <{root.tag}>; a template is a <domain>"
    if root.get("type") not in DOMAIN_TYPES:
        return _line(root), (f"domain type {root.get('type')!r} is not allowed; use one of "
                             f"{', '.join(DOMAIN_TYPES)} (test for simulated hosts)")
    for child in root:
        if child.tag in MANAGED_ELEMENTS:
            return _line(child), (f"<{child.tag}> is set by hostdev from the offering and the "
                                  "VM; remove it from the template")
    for hostdev in root.iter("hostdev"):
        return _line(hostdev), ("<hostdev> is hostdev's: it passes through the devices the "
                                "offering asks for; remove it from the template")
    for devices in root.findall("devices"):
        for device in devices:
            problem = _device_problem(device)
            if problem is not None:
                return _line(device), problem
    storage = root.find(f"metadata/{{{TEMPLATE_NS}}}template/{{{TEMPLATE_NS}}}storage")
    if storage is not None and storage.get("shared", "no") not in ("yes", "no"):
        return _line(storage), (f"storage shared={storage.get('shared')!r}; write "
                                "shared='yes' (the pool is on every host) or shared='no'")
    return None


def _device_problem(device: etree._Element) -> str | None:
    if not isinstance(device.tag, str):
        return None  # a comment or processing instruction
    if device.tag not in DEVICES:
        return (f"device <{device.tag}> is not allowed in a template; allowed: "
                f"{', '.join(DEVICES)}")
    if device.tag == "interface":
        kind = device.get("type")
        if kind not in INTERFACE_TYPES:
            return (f"interface type {kind!r} is not allowed; a template's NICs name a "
                    "libvirt network (type='network') or a host bridge (type='bridge')")
        source = device.find("source")
        if source is None or not source.get(kind or ""):
            return f"interface type {kind!r} needs <source {kind}='...'/>"
    if device.tag == "disk":
        return _disk_problem(device)
    return None


def _disk_problem(disk: etree._Element) -> str | None:
    kind, role = disk.get("type"), disk.get("device", "disk")
    if role != "disk":
        return None  # a cdrom or floppy is read-only
    if kind == "volume":
        source, target = disk.find("source"), disk.find("target")
        if source is None or not source.get("pool") or not source.get("volume"):
            return ("a volume disk needs <source pool='...' volume='...'/>: the base image "
                    "each VM gets its own copy of")
        if target is None or not target.get("dev"):
            return "a volume disk needs <target dev='...'/> (e.g. vda)"
        return None
    if disk.find("readonly") is not None or disk.find("shareable") is not None:
        return None
    return (f"a writable disk of type {kind!r} would be written by every VM of the template; "
            "use a base image in a storage pool (type='volume') or mark it <readonly/>")


@functools.cache
def _schema(path: Path) -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(path)))


def _schema_problem(root: etree._Element, schema: Path | None) -> tuple[int, str] | None:
    """Validates the template, completed with placeholders, against libvirt's schema."""
    if schema is None or not schema.exists():
        log.info("template_schema_unavailable", schema=str(schema))
        return None
    whole = copy.deepcopy(root)  # keeps the line numbers; the placeholders stay out of root
    for index, (tag, text) in enumerate(_PLACEHOLDERS):
        element = etree.Element(tag)
        element.text = text
        whole.insert(index, element)
    relaxng = _schema(schema)
    if relaxng.validate(whole.getroottree()):
        return None
    culprit = _culprit(relaxng, whole)
    if culprit is None:
        errors = [e for e in relaxng.error_log if e.line > 0] or list(relaxng.error_log)
        line = errors[0].line if errors and errors[0].line > 0 else 1
        reason = errors[0].message if errors else "invalid"
        return line, f"libvirt's domain schema refuses it ({reason}); {_SEE}"
    attrs = "".join(f" {k!s}='{v!s}'" for k, v in culprit.attrib.items())
    return _line(culprit), (f"libvirt's domain schema does not accept <{culprit.tag}{attrs}> "
                            f"there; {_SEE}")


def _steps(root: etree._Element, element: etree._Element) -> list[int]:
    """Returns the child indexes leading from ``root`` to ``element``."""
    steps: list[int] = []
    while element is not root:
        parent = element.getparent()
        assert parent is not None  # element descends from root
        steps.append(parent.index(element))
        element = parent
    return steps[::-1]


def _culprit(relaxng: etree.RelaxNG, root: etree._Element) -> etree._Element | None:
    """Returns the deepest element without which the schema accepts the domain, if any.

    libxml2 reports a refused device as a fault of the whole ``<devices>``
    (an interleave); leaving one element out at a time shows which it is.
    """
    found: tuple[int, etree._Element] | None = None
    for element in root.iterdescendants():
        if not isinstance(element.tag, str) or getattr(element, "sourceline", None) is None:
            continue  # a comment, or a placeholder
        steps = _steps(root, element)
        trial = copy.deepcopy(root)
        parent = trial
        for index in steps[:-1]:
            parent = parent[index]
        del parent[steps[-1]]
        if relaxng.validate(trial.getroottree()) and (found is None or len(steps) > found[0]):
            found = (len(steps), element)
    return found[1] if found else None
