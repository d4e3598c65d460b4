"""The limits of every field of the protocol, as named types used by every message.

Each type bounds a string's length and characters, a number's range or a
list's size, so a body that decodes fits the management database's columns
(a ``String(64)`` column takes a ``Guid``, ``Integer`` an ``Id`` no larger than
it holds) and no field can carry megabytes into a handler, a log or a header.
msgspec enforces them at decode; the JSON Schemas carry them too.
"""

from __future__ import annotations

import re
from typing import Annotated, Final

import msgspec

from hostdev.messages.pci_address import PciAddress


def _whole(body: str) -> str:
    """Anchors a pattern to the whole string.

    msgspec applies patterns with ``re.search``, where ``$`` also matches
    before a final newline; the lookahead refuses that newline. The pattern
    stays valid JSON Schema (ECMA-262) syntax.
    """
    return f"^{body}$(?!\\n)"


#: The characters of a name: VM, offering, device, host and guid.
_NAME_BODY = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"
#: Printable text on one line: no control characters.
_LINE = _whole(r"[^\x00-\x1f\x7f]*")

MAX_NAME: Final = 64
MAX_LABEL: Final = 255
MAX_URI: Final = 1024
MAX_DETAILS: Final = 4096
MAX_LONG_DETAILS: Final = 65535
MAX_CPUS: Final = 65536
MAX_MEMORY_MB: Final = 2**40
MAX_INT32: Final = 2**31 - 1
MAX_INT64: Final = 2**63 - 1
#: The largest PCI class code: 8 bits each of base class, subclass and interface.
MAX_PCI_CLASS: Final = 0xFFFFFF
MAX_SECONDS: Final = 86400.0
#: Devices of one name an offering (and so a VM) may ask for.
MAX_COUNT: Final = 64
MAX_JOBS_LISTED: Final = 1000
#: PCI devices one host reports, and hostdevs one domain or command names.
MAX_DEVICES: Final = 256
#: Domains one report lists.
MAX_DOMAINS: Final = 4096
#: Device names one offering asks for.
MAX_PCI_REQUESTS: Final = 64
#: Hosts a request asks placement to avoid.
MAX_AVOID: Final = 1024
#: Rows one API response lists.
MAX_ROWS: Final = 1_000_000
#: The longest domain XML, a template's or a rendered one, in characters.
MAX_DOMAIN_XML: Final = 131072

#: The VM name rule; offering names follow it too.
NAME_RULE: Final = "1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
#: The same rule as a compiled pattern, for code that checks names outside a decode.
NAME_PATTERN: Final = re.compile(_whole(_NAME_BODY))
#: A host's guid: a name without '.', since it is one word of the routing keys
#: (``agent.<guid>.<Type>``) and of the broker user ``agent-<guid>``.
_GUID_BODY = r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}"
GUID_RULE: Final = "1 to 64 characters from A-Z a-z 0-9 _ -, starting with a letter or digit"
#: The guid rule as a compiled pattern, for the properties file and the broker-user recipe.
GUID_PATTERN: Final = re.compile(_whole(_GUID_BODY))
_DEVICE_NAME = _whole(r"[A-Za-z0-9_.\-]{1,64}")
#: A PCI device name, for code that checks names outside a decode (offerings' lists).
DEVICE_NAME_PATTERN: Final = re.compile(_DEVICE_NAME)


def _text(limit: int, pattern: str, description: str, min_length: int = 0) -> msgspec.Meta:
    return msgspec.Meta(min_length=min_length, max_length=limit, pattern=pattern,
                        description=description)


Guid = Annotated[str, _text(MAX_NAME, _whole(_GUID_BODY), f"A host's guid: {GUID_RULE}.", 1)]
HostName = Annotated[str, _text(
    MAX_LABEL, _whole(r"[A-Za-z0-9_.\-]+"),
    "A host's name: 1 to 255 letters, digits, '_', '.' or '-'.", 1)]
VmName = Annotated[str, _text(MAX_NAME, _whole(_NAME_BODY), f"A VM name: {NAME_RULE}.", 1)]
OfferingName = Annotated[str, _text(MAX_NAME, _whole(_NAME_BODY),
                                    f"An offering name: {NAME_RULE}.", 1)]
TemplateName = Annotated[str, _text(MAX_NAME, _whole(_NAME_BODY),
                                    f"A domain template name: {NAME_RULE}.", 1)]
DeviceName = Annotated[str, _text(
    MAX_NAME, _DEVICE_NAME,
    "A PCI device name: 1 to 64 letters, digits, '_', '.' or '-'.", 1)]
Uuid = Annotated[str, _text(36, _whole(r"[0-9A-Za-z\-]+"),
                            "A VM's uuid: 1 to 36 letters, digits or '-'.", 1)]
Ref = Annotated[str, _text(MAX_LABEL, _LINE,
                           "A name, guid or uuid: 1 to 255 characters, no control characters.",
                           1)]
Label = Annotated[str, msgspec.Meta(max_length=MAX_LABEL,
                                    description="A name as stored: at most 255 characters.")]
DomainName = Annotated[str, _text(MAX_LABEL, _LINE,
                                  "A libvirt domain name: at most 255 characters, no control "
                                  "characters.")]
HexId = Annotated[str, _text(8, _whole(r"(0x)?[0-9A-Fa-f]{0,6}"),
                             "A PCI vendor or product id such as 0x8086 (or empty).")]
HardwareName = Annotated[str, _text(MAX_LABEL, _LINE,
                                    "A vendor's or product's name as the host reports it: at "
                                    "most 255 characters, no control characters.")]
Reason = Annotated[str, _text(MAX_LABEL, _LINE,
                              "An operator's reason: at most 255 characters, no control "
                              "characters.")]
Word = Annotated[str, _text(MAX_NAME, _whole(r"[A-Za-z0-9_.:/\-]*"),
                            "A code, kind or step: at most 64 letters, digits, '_', '.', ':', "
                            "'/' or '-'.")]
Timestamp = Annotated[str, _text(MAX_NAME, _whole(r"[0-9A-Za-z:.+\-]*"),
                                 "An ISO 8601 UTC timestamp (or empty).")]
Version = Annotated[str, _text(MAX_NAME, _LINE,
                               "A version: at most 64 characters, no control characters.")]
Uri = Annotated[str, _text(MAX_URI, _whole(r"[^\s\x00-\x1f\x7f]*"),
                           "A URI: at most 1024 characters, no spaces or control characters.")]
FilePath = Annotated[str, _text(MAX_URI, _LINE,
                                "A file on a host: at most 1024 characters, no control "
                                "characters.")]
DomainXml = Annotated[str, msgspec.Meta(max_length=MAX_DOMAIN_XML,
                                        description="A libvirt domain XML: at most 131072 "
                                                    "characters.")]
PciDeviceText = Annotated[str, _text(
    MAX_DETAILS, _whole(r"[A-Za-z0-9_.:, \-]*"),
    "A list of PCI device names, comma-separated, each optionally ':count' "
    "(e.g. 10GE,10GE or 10GE:2).")]
Details = Annotated[str, msgspec.Meta(max_length=MAX_DETAILS,
                                      description="Free text for people: at most 4096 "
                                                  "characters.")]
LongDetails = Annotated[str, msgspec.Meta(max_length=MAX_LONG_DETAILS,
                                          description="Free text for people: at most 65535 "
                                                      "characters.")]

Cpus = Annotated[int, msgspec.Meta(ge=1, le=MAX_CPUS, description="A number of CPUs: 1 to 65536.")]
MemoryMb = Annotated[int, msgspec.Meta(ge=1, le=MAX_MEMORY_MB,
                                       description="An amount of memory in MiB: 1 to 2^40.")]
Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT,
                                    description="A number of devices of one name: 1 to 64.")]
Id = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64, description="A row id: 0 to 2^63-1.")]
IommuGroup = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT32,
                                         description="An IOMMU group: 0 to 2^31-1.")]
NumaNode = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT32,
                                       description="A NUMA node: 0 to 2^31-1.")]
PciClass = Annotated[int, msgspec.Meta(ge=0, le=MAX_PCI_CLASS,
                                       description="A 24-bit PCI class code (0x020000 an "
                                                   "Ethernet controller): 0 to 0xffffff.")]
Amount = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT32,
                                     description="A count or size as stored: 0 to 2^31-1.")]
BigAmount = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64,
                                        description="A size as stored: 0 to 2^63-1.")]
JobLimit = Annotated[int, msgspec.Meta(ge=1, le=MAX_JOBS_LISTED,
                                       description="A number of jobs to list: 1 to 1000.")]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_SECONDS,
                                        description="A duration in seconds: 0 to 86400.")]

PciAddresses = Annotated[tuple[PciAddress, ...], msgspec.Meta(max_length=MAX_DEVICES)]
HostRefs = Annotated[tuple[Ref, ...], msgspec.Meta(max_length=MAX_AVOID)]


def clip(text: str, limit: int = MAX_DETAILS) -> str:
    """Returns ``text`` cut to ``limit`` characters, marked as cut when it was."""
    if len(text) <= limit:
        return text
    mark = " [cut]"
    return text[: limit - len(mark)] + mark

#: An agent process's boot id: random per start (a uuid4 in hex), so reports order per boot.
BootId = Annotated[str, _text(MAX_NAME, _whole(r"[A-Za-z0-9\-]*"),
                              "An agent's boot id: at most 64 letters, digits or '-' (empty "
                              "from an agent that does not order its reports).")]
#: A SHA-256 of a report's content (``commands.domains_digest``), in lower-case hex.
Digest = Annotated[str, _text(64, _whole(r"([0-9a-f]{64})?"),
                              "A SHA-256 in lower-case hex (empty from an agent that sends "
                              "none).")]
#: A position in a boot's sequence of reports and answers.
Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64,
                                  description="A sequence number within one boot: 0 to "
                                              "2^63-1 (0: not ordered).")]
