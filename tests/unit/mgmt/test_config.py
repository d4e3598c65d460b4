"""Tests of mgmt.properties parsing into MgmtConfig."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostdev.messages.runtime.properties import parse_properties
from hostdev.mgmt.config import MgmtConfig, config_from_properties, config_keys, load_config
from hostdev.mgmt.errors import ConfigError

SAMPLE = Path(__file__).resolve().parents[3] / "etc" / "mgmt.properties"


def _config(text: str) -> MgmtConfig:
    return config_from_properties(parse_properties(text, "mgmt.properties"))


def test_sample_file_loads() -> None:
    """The commented sample in etc/ loads and sets every documented key."""
    config = load_config(SAMPLE)
    assert config.db_url.startswith("sqlite:///")
    assert config.ping_interval_s == 60.0
    assert config.host_down_after_s == 300.0
    assert config.pci_migration_policy == "forbid"
    keys = {p.key for p in parse_properties(SAMPLE.read_text(), str(SAMPLE))}
    assert keys == set(config_keys())


def test_empty_file_gives_defaults() -> None:
    """An empty file yields the embedded defaults (SQLite, local broker)."""
    assert _config("") == MgmtConfig()


def test_durations_accept_units() -> None:
    """Durations accept ms, s, m, h and bare seconds."""
    config = _config("ping.interval=500ms\nhost.disconnected.timeout=2\n"
                     "host.down.timeout=1h\njob.start.timeout=3m\n")
    assert config.ping_interval_s == 0.5
    assert config.host_disconnected_after_s == 2.0
    assert config.host_down_after_s == 3600.0
    assert config.job_start_timeout_s == 180.0


def test_bad_duration_names_file_line_and_expected() -> None:
    """A bad duration names the file, the line and the accepted forms."""
    with pytest.raises(ConfigError, match=r"mgmt.properties:2: 'soon': ping.interval must be a "
                       r"positive duration: a number of seconds or one with a unit"):
        _config("# comment\nping.interval=soon\n")


def test_unknown_key_is_refused() -> None:
    """A misspelt key is an error listing the known keys."""
    with pytest.raises(ConfigError, match=r":1: 'db.ulr': a known key: amqp.queue.type"):
        _config("db.ulr=sqlite:///x\n")


def test_duplicate_key_is_refused() -> None:
    """A key set twice names both lines."""
    with pytest.raises(ConfigError, match=r":2: 'log.level'.*already set at line 1"):
        _config("log.level=info\nlog.level=debug\n")


def test_bad_policy_lists_choices() -> None:
    """The migration policy must be forbid or detach-attach."""
    with pytest.raises(ConfigError, match="one of forbid, detach-attach"):
        _config("pci.migration.policy=move\n")


def test_bad_db_url() -> None:
    """A database URL that is not SQLite or MySQL is refused with an example."""
    with pytest.raises(ConfigError, match="mysql\\+pymysql://USER"):
        _config("db.url=postgres://x/y\n")


def test_down_shorter_than_disconnected_is_refused() -> None:
    """host.down.timeout shorter than host.disconnected.timeout is an error."""
    with pytest.raises(ConfigError, match=r"host.down.timeout .* is shorter"):
        _config("host.disconnected.timeout=60\nhost.down.timeout=30\n")


def test_missing_file(tmp_path: Path) -> None:
    """A missing file says how to pass one."""
    with pytest.raises(ConfigError, match="does not exist; pass --config"):
        load_config(tmp_path / "nope.properties")


def test_db_url_lists_galera_nodes() -> None:
    """db.url takes several mysql+pymysql URLs separated by ';'; a bad one is named."""
    nodes = "mysql+pymysql://h@db1/hostdev;mysql+pymysql://h@db2/hostdev"
    assert _config(f"db.url={nodes}\n").db_url == nodes
    with pytest.raises(ConfigError, match=r":1: 'postgres://db2/h': db.url must be a SQLAlchemy"):
        _config("db.url=mysql+pymysql://h@db1/hostdev;postgres://db2/h\n")
