"""`hostdev-mgmt db ...`: upgrade, current and schema on a SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostdev.mgmt.daemon import main


def test_db_upgrade_then_current(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`db upgrade` applies the migrations and `db current` reports the head revision."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["db", "current", "--db-url", url]) == 0
    assert "none" in capsys.readouterr().out
    assert main(["db", "upgrade", "--db-url", url]) == 0
    assert main(["db", "current", "--db-url", url]) == 0
    assert capsys.readouterr().out.strip().endswith("0011")


def test_db_upgrade_without_url_explains(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --db-url or HOSTDEV_DB_URL the command fails and says what to pass."""
    monkeypatch.delenv("HOSTDEV_DB_URL", raising=False)
    assert main(["db", "upgrade"]) == 1
    assert "--db-url" in capsys.readouterr().err


def test_db_schema_prints_mysql_ddl(capsys: pytest.CaptureFixture[str]) -> None:
    """`db schema` prints the MySQL DDL without connecting anywhere."""
    assert main(["db", "schema"]) == 0
    assert "ENGINE=InnoDB" in capsys.readouterr().out
