"""Tests of ``hostdev-mgmt run``'s start-up checks."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.errors import MgmtError
from hostdev.mgmt.persistence import database
from hostdev.mgmt.runner import add_run_command, check_schema


def test_new_sqlite_file_is_migrated(tmp_path: Path) -> None:
    """A brand-new SQLite file gets the schema at start-up (the embedded default)."""
    url = f"sqlite:///{tmp_path / 'mgmt.sqlite'}"
    check_schema(MgmtConfig(db_url=url))
    assert database.current_revision(url) is not None


def test_mariadb_without_schema_says_which_command_to_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A MySQL database without the schema is refused with the upgrade command."""
    monkeypatch.setattr(database, "current_revision", lambda url: None)
    with pytest.raises(MgmtError, match="run: hostdev-mgmt db upgrade"):
        check_schema(MgmtConfig(db_url="mysql+pymysql://u:p@db/hostdev"))


def test_run_command_parses_config_and_overrides() -> None:
    """`run --config F --db-url U` is accepted and dispatches to the run handler."""
    parser = argparse.ArgumentParser()
    add_run_command(parser.add_subparsers())
    args = parser.parse_args(["run", "--config", "etc/mgmt.properties", "--db-url",
                              "sqlite:///x.db", "--name", "m1"])
    assert (args.config, args.db_url, args.name) == ("etc/mgmt.properties", "sqlite:///x.db",
                                                     "m1")
    assert callable(args.handler)
