"""The management daemon's configuration: a typed, frozen view of ``mgmt.properties``.

Every value is validated at start-up; an error names the file, the line, the
offending text and what was expected. Unknown keys are errors too, so a typo
never silently leaves a default in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_args

from hostdev.messages.bus.contract import QUEUE_TYPES
from hostdev.messages.runtime.properties import (
    PropertiesError,
    Property,
    choice,
    duration,
    port_or_off,
    read_properties,
    url,
)
from hostdev.messages.values import MigrationPolicy
from hostdev.mgmt.errors import ConfigError

DEFAULT_DB_URL = "sqlite:///hostdev-mgmt.sqlite"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"

_LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class MgmtConfig:
    """Everything ``hostdev-mgmt`` reads from ``mgmt.properties``.

    Durations are seconds. ``host_disconnected_after_s`` is how long a host
    may stay silent before it is Disconnected; ``host_down_after_s`` before it
    is Down (and its free devices stop being offered).
    """

    db_url: str = DEFAULT_DB_URL
    amqp_url: str = DEFAULT_AMQP_URL
    amqp_queue_type: str = "quorum"
    ping_interval_s: float = 60.0
    host_disconnected_after_s: float = 90.0
    host_down_after_s: float = 300.0
    host_sweep_interval_s: float = 10.0
    pci_migration_policy: MigrationPolicy = "forbid"
    job_start_timeout_s: float = 120.0
    job_stop_timeout_s: float = 120.0
    job_migrate_timeout_s: float = 360.0
    job_attach_timeout_s: float = 60.0
    job_sweep_interval_s: float = 5.0
    log_format: str = "json"
    log_level: str = "info"
    metrics_port: int | None = None


_DB_URL = url(("sqlite", "mysql+pymysql", "mariadb+pymysql"),
              "a SQLAlchemy URL: sqlite:///PATH or mysql+pymysql://USER:PASSWORD@HOST/DATABASE "
              "(several mysql+pymysql:// URLs separated by ';': the nodes of a Galera cluster)",
              separator=";")
_AMQP_URL = url(("amqp", "amqps", "memory"),
                "amqp://USER:PASSWORD@HOST:PORT/VHOST (or amqps://; several separated by ';' "
                "for failover; memory:// for the demo)", separator=";")


#: key in the file -> (dataclass field, parser)
_KEYS: dict[str, tuple[str, Callable[[Property], Any]]] = {
    "db.url": ("db_url", _DB_URL),
    "amqp.url": ("amqp_url", _AMQP_URL),
    "amqp.queue.type": ("amqp_queue_type", choice(*QUEUE_TYPES)),
    "ping.interval": ("ping_interval_s", duration),
    "host.disconnected.timeout": ("host_disconnected_after_s", duration),
    "host.down.timeout": ("host_down_after_s", duration),
    "host.sweep.interval": ("host_sweep_interval_s", duration),
    "pci.migration.policy": ("pci_migration_policy", choice(*get_args(MigrationPolicy))),
    "job.start.timeout": ("job_start_timeout_s", duration),
    "job.stop.timeout": ("job_stop_timeout_s", duration),
    "job.migrate.timeout": ("job_migrate_timeout_s", duration),
    "job.attach.timeout": ("job_attach_timeout_s", duration),
    "job.sweep.interval": ("job_sweep_interval_s", duration),
    "log.format": ("log_format", choice("json", "console")),
    "log.level": ("log_level", choice(*_LOG_LEVELS)),
    "metrics.port": ("metrics_port", port_or_off),
}


def config_from_properties(entries: Sequence[Property]) -> MgmtConfig:
    """Builds the configuration from parsed entries; the first bad entry raises.

    Raises:
        ConfigError: an unknown or duplicated key, a bad value, or timeouts
            that contradict each other; the text names file and line.
    """
    values: dict[str, Any] = {}
    seen: dict[str, Property] = {}
    try:
        for prop in entries:
            if prop.key not in _KEYS:
                raise prop.error("a known key: " + ", ".join(sorted(_KEYS)), text=prop.key)
            if prop.key in seen:
                first = seen[prop.key]
                raise prop.error(f"each key once; {prop.key} is already set at line "
                                 f"{first.line}", text=prop.key)
            seen[prop.key] = prop
            field, parse = _KEYS[prop.key]
            values[field] = parse(prop)
    except PropertiesError as exc:
        raise ConfigError(str(exc)) from None
    config = MgmtConfig(**values)
    if config.host_down_after_s < config.host_disconnected_after_s:
        where = seen.get("host.down.timeout") or seen.get("host.disconnected.timeout")
        text = f"host.down.timeout ({config.host_down_after_s:g}s) is shorter than " \
               f"host.disconnected.timeout ({config.host_disconnected_after_s:g}s)"
        location = f"{where.path}:{where.line}: " if where else ""
        raise ConfigError(f"{location}{text}: make host.down.timeout at least as long")
    return config


def load_config(path: str | Path) -> MgmtConfig:
    """Reads ``mgmt.properties`` at ``path`` into a validated ``MgmtConfig``.

    Raises:
        ConfigError: the file is missing or unreadable, or a value is invalid.
    """
    try:
        entries = read_properties(path)
    except PropertiesError as exc:
        raise ConfigError(str(exc)) from None
    return config_from_properties(entries)


def config_keys() -> dict[str, str]:
    """Returns each properties key with the ``MgmtConfig`` field it sets (for docs)."""
    names = {f.name for f in fields(MgmtConfig)}
    return {key: field for key, (field, _) in _KEYS.items() if field in names}
