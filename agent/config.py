"""``agent.properties``: parsed and validated into a typed, frozen ``AgentConfig``.

Every bad value stops the agent before it connects anywhere, with a
``ConfigError`` naming the file, the line, the offending text and what is
expected. Unknown keys are warnings (a typo must not take a host down).
"""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import structlog

from hostdev.agent.errors import ConfigError
from hostdev.agent.lab_devices import MAX_STAND_INS
from hostdev.messages.bus.contract import QUEUE_TYPES
from hostdev.messages.errors import PciAddressError
from hostdev.messages.limits import GUID_PATTERN, GUID_RULE
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.runtime.properties import (
    PropertiesError,
    Property,
    boolean,
    choice,
    duration,
    matching,
    parse_properties,
    port_or_off,
    read_text,
    url,
)

log = structlog.get_logger()

DEFAULT_PATH = "/etc/hostdev/agent.properties"
#: Where the agent keeps what must survive its restart (systemd's StateDirectory).
DEFAULT_STATE_DIR = "/var/lib/hostdev-agent"

LogFormat = Literal["json", "console"]
#: What the agent does with a listed device whose IOMMU group has a member that is
#: neither listed nor a bridge: ``refuse`` withholds it from offer, ``allow`` offers it.
PartialGroups = Literal["refuse", "allow"]
LogLevel = Literal["debug", "info", "warning", "error"]

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NAME_EXPECTED = "a device name of 1 to 64 characters from A-Z a-z 0-9 _ . -"
_ENTRY_EXPECTED = "[domain:]bus:slot.function|name, e.g. 28:00.1|10GE"


@dataclass(frozen=True)
class PciDeviceEntry:
    """One device set aside for passthrough, as the operator listed it."""

    address: PciAddress
    name: str
    line: int = 0


@dataclass(frozen=True)
class AgentConfig:
    """The agent's configuration, validated; ``guid`` is None until generated."""

    path: str = DEFAULT_PATH
    guid: str | None = None
    name: str = field(default_factory=socket.gethostname)
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    amqp_queue_type: Literal["quorum", "classic"] = "quorum"
    libvirt_uri: str = "qemu:///system"
    migration_uri: str = ""
    pci_devices: tuple[PciDeviceEntry, ...] = ()
    #: ``pci.iommu.partial.groups``: see ``PartialGroups``.
    partial_groups: PartialGroups = "refuse"
    ping_interval_s: float = 60.0
    attach_timeout_s: float = 10.0
    detach_timeout_s: float = 10.0
    migration_timeout_s: float = 300.0
    log_format: LogFormat = "json"
    log_level: LogLevel = "info"
    metrics_port: int | None = None
    #: Reset every device a VM lets go of before it is offered again (``pci.reset.on.release``).
    pci_reset_on_release: bool = False
    #: The directory of the agent's state files (``state.dir``); see ``default_state_dir``.
    state_dir: str = DEFAULT_STATE_DIR
    #: Lab only (``lab.emulated.devices``): emulated stand-ins instead of passthrough.
    lab_emulated_devices: bool = False
    warnings: tuple[str, ...] = ()

    @property
    def inventory(self) -> dict[PciAddress, str]:
        """The listed devices: address to name."""
        return {entry.address: entry.name for entry in self.pci_devices}


def parse_pci_devices(prop: Property, source: Sequence[str] = ()) -> tuple[PciDeviceEntry, ...]:
    """Parses ``pci.devices``: comma-separated ``[domain:]bus:slot.function|name``.

    Args:
        prop: the ``pci.devices`` entry.
        source: the file's physical lines, so an entry on a continuation line
            is reported with its own line number (else the key's line).
    """
    entries: list[PciDeviceEntry] = []
    seen: dict[PciAddress, str] = {}
    if not prop.value:
        return ()
    cursor = prop.line
    for raw in prop.value.split(","):
        text = raw.strip()
        for number in range(cursor, len(source) + 1):
            if text and text in source[number - 1]:
                cursor = number
                break
        prop = replace(prop, line=cursor)
        if not text:
            raise _error(prop, prop.value,
                         f"an entry between commas is empty; expected {_ENTRY_EXPECTED}")
        if "|" not in text:
            raise _error(prop, text, f"the entry has no '|name'; expected {_ENTRY_EXPECTED}")
        address_text, name = (part.strip() for part in text.split("|", 1))
        try:
            address = PciAddress(address_text)
        except PciAddressError as exc:
            raise _error(prop, text, str(exc)) from None
        if not name:
            raise _error(prop, text, f"the name after '|' is empty; expected {_NAME_EXPECTED}")
        if not _NAME.fullmatch(name):
            raise _error(prop, text, f"the name {name!r} is invalid; expected {_NAME_EXPECTED}")
        if address in seen:
            raise _error(prop, text, f"the address {address} is listed twice (also as "
                         f"{seen[address]!r}); list each device once")
        seen[address] = text
        entries.append(PciDeviceEntry(address=address, name=name, line=prop.line))
    return tuple(entries)


def _error(prop: Property, text: str, expected: str) -> ConfigError:
    return ConfigError(prop.path, prop.line, text, expected)


def _config_error(exc: PropertiesError) -> ConfigError:
    """Returns the agent's ConfigError for a properties error (same file, line and texts)."""
    return ConfigError(exc.path, exc.line, exc.text, exc.expected)


_NAME_RULE = "1 to 64 characters from A-Z a-z 0-9 _ . -"
_LIBVIRT_URI = url((), "a libvirt URI such as qemu:///system, test:///abs/node.xml or "
                   "simulated:///abs/spec.json")


def absolute_path(prop: Property) -> str:
    """Parses an absolute directory path (``state.dir``)."""
    value = prop.value.strip()
    if not value.startswith("/") or any(ord(c) < 32 for c in value):
        raise prop.error(f"{prop.key} must be an absolute directory path, such as "
                         f"{DEFAULT_STATE_DIR}")
    return value


def yes_no(prop: Property) -> bool:
    """Parses ``yes``/``no`` (also ``true``/``false``)."""
    value = prop.value.strip().lower()
    if value not in ("yes", "no", "true", "false"):
        raise prop.error(f"{prop.key} must be yes or no")
    return value in ("yes", "true")


#: key -> (AgentConfig field, parser)
_KEYS: dict[str, tuple[str, Callable[[Property], object]]] = {
    "guid": ("guid", matching(GUID_PATTERN, f"{GUID_RULE} (delete the line to have one "
                                            "generated)")),
    "name": ("name", matching(_NAME, f"{_NAME_RULE} (delete the line to use the host name)")),
    "amqp.url": ("amqp_url", url(("amqp", "amqps"), "amqp://user:pass@host:port/vhost or "
                                 "amqps://..., several separated by ';' for failover",
                                 separator=";")),
    "amqp.queue.type": ("amqp_queue_type", choice(*QUEUE_TYPES)),
    "libvirt.uri": ("libvirt_uri", _LIBVIRT_URI),
    "migration.uri": ("migration_uri", _LIBVIRT_URI),
    "pci.devices": ("pci_devices", parse_pci_devices),
    "pci.reset.on.release": ("pci_reset_on_release", boolean),
    "pci.iommu.partial.groups": ("partial_groups", choice(*get_args(PartialGroups))),
    "ping.interval": ("ping_interval_s", duration),
    "timeout.attach": ("attach_timeout_s", duration),
    "timeout.detach": ("detach_timeout_s", duration),
    "timeout.migration": ("migration_timeout_s", duration),
    "log.format": ("log_format", choice("json", "console")),
    "log.level": ("log_level", choice("debug", "info", "warning", "error")),
    "metrics.port": ("metrics_port", port_or_off),
    "state.dir": ("state_dir", absolute_path),
    "lab.emulated.devices": ("lab_emulated_devices", yes_no),
}

KNOWN_KEYS = tuple(_KEYS)


def config_from_properties(props: Sequence[Property], path: str,
                           source: Sequence[str] = ()) -> AgentConfig:
    """Builds the configuration from parsed entries; raises ``ConfigError`` on a bad value.

    ``source`` (the file's lines) lets errors in a continued ``pci.devices``
    name the physical line of the offending entry.
    """
    values: dict[str, Any] = {}
    warnings: list[str] = []
    lines: dict[str, int] = {}
    for prop in props:
        spec = _KEYS.get(prop.key)
        if spec is None:
            warnings.append(f"{path}:{prop.line}: unknown key {prop.key!r} is ignored "
                            f"(known keys: {', '.join(KNOWN_KEYS)})")
            continue
        if prop.key in lines:
            warnings.append(f"{path}:{prop.line}: {prop.key!r} repeats line {lines[prop.key]}; "
                            "the last one wins")
        lines[prop.key] = prop.line
        attribute, parse = spec
        try:
            values[attribute] = (parse_pci_devices(prop, source) if prop.key == "pci.devices"
                                 else parse(prop))
        except PropertiesError as exc:
            raise _config_error(exc) from None
    config = AgentConfig(path=path, warnings=tuple(warnings), **values)
    if config.lab_emulated_devices and len(config.pci_devices) > MAX_STAND_INS:
        raise ConfigError(path, lines["pci.devices"], f"{len(config.pci_devices)} devices",
                          f"at most {MAX_STAND_INS} devices with lab.emulated.devices=yes "
                          "(the guest slots 0x10-0x1f its stand-ins sit at)")
    if not config.migration_uri:
        config = replace(config, migration_uri=default_migration_uri(config.libvirt_uri))
    if "state_dir" not in values:
        config = replace(config, state_dir=default_state_dir(config.libvirt_uri))
    return config


def default_state_dir(libvirt_uri: str) -> str:
    """Returns the state directory when ``state.dir`` is unset.

    A real host keeps its state in ``/var/lib/hostdev-agent``. A simulated
    host keeps it beside its spec (``<dir>/<spec name>.agent/``), as it keeps
    its domains: several simulated hosts share one machine and must not
    share their state.
    """
    scheme, _, rest = libvirt_uri.partition("://")
    if scheme in ("simulated", "test") and rest.startswith("/") and len(rest) > 1:
        spec = Path(rest)
        return str(spec.with_name(f"{spec.stem}.agent"))
    return DEFAULT_STATE_DIR


def default_migration_uri(libvirt_uri: str, hostname: str | None = None) -> str:
    """Returns the URI peers migrate to when ``migration.uri`` is unset.

    A local ``driver:///path`` becomes ``driver+tcp://<this host's FQDN>/path``;
    a remote URI and a simulated host's URI are used as they are.
    """
    scheme, _, rest = libvirt_uri.partition("://")
    if scheme in ("simulated", "test") or "+" in scheme or not rest.startswith("/"):
        return libvirt_uri
    return f"{scheme}+tcp://{hostname or socket.getfqdn()}{rest}"


def parse_config(text: str, path: str = "<string>") -> AgentConfig:
    """Parses and validates the text of an ``agent.properties`` file."""
    return config_from_properties(parse_properties(text, path), path, text.splitlines())


def load_config(path: str | Path = DEFAULT_PATH) -> AgentConfig:
    """Reads and validates ``agent.properties``; a missing file is a ``ConfigError``."""
    try:
        return parse_config(read_text(path, "the sample etc/agent.properties"), str(path))
    except PropertiesError as exc:
        raise _config_error(exc) from None


def ensure_guid(config: AgentConfig) -> AgentConfig:
    """Returns the config with a guid, generating one and appending it to the file if absent.

    The guid is what management knows the host by, so it is written back at
    once: a restart must announce the same host.
    """
    if config.guid is not None:
        return config
    guid = str(uuid.uuid4())
    with open(config.path, "a", encoding="utf-8") as handle:
        handle.write(f"\n# Generated by hostdev-agent on first start; keep it: management "
                     f"knows this host by it.\nguid={guid}\n")
    log.info("guid_generated", guid=guid, path=config.path)
    return replace(config, guid=guid)
