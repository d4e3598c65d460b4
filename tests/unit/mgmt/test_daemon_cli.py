"""Tests of hostdev-mgmt's command line beyond the database commands."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostdev.mgmt.daemon import main


def test_rabbitmq_user_add_prints_the_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    """rabbitmq-user add prints the rabbitmqctl lines for agent-<guid>, changing nothing."""
    assert main(["rabbitmq-user", "add", "h7", "--password", "pw", "--vhost", "cloud"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "rabbitmqctl add_user agent-h7 -- pw"
    assert out[2].startswith("rabbitmqctl set_topic_permissions -p cloud agent-h7 "
                             "hostdev.commands '^mgmt\\.h7\\.'")


def test_rabbitmq_user_add_refuses_a_guid_that_is_not_a_plain_name(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A guid that would break the permission regexes is refused with what is expected."""
    assert main(["rabbitmq-user", "add", "a.*"]) == 1
    assert "expected 1-64 characters" in capsys.readouterr().err


def test_db_commands_read_db_url_from_config(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """db upgrade --config uses the file's db.url, as run --config does."""
    database = tmp_path / "hostdev.sqlite"
    config = tmp_path / "mgmt.properties"
    config.write_text(f"db.url=sqlite:///{database}\n")
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    assert database.exists()
    assert main(["db", "current", "--config", str(config)]) == 0
    assert "none" not in capsys.readouterr().out.splitlines()[-1]


def test_db_commands_without_a_url_say_how_to_give_one(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --db-url, --config or $HOSTDEV_DB_URL the error names all three."""
    monkeypatch.delenv("HOSTDEV_DB_URL", raising=False)
    assert main(["db", "current"]) == 1
    err = capsys.readouterr().err
    assert "--config" in err and "--db-url" in err and "HOSTDEV_DB_URL" in err
