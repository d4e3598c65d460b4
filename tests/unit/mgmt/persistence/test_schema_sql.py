"""The committed sql/schema-mysql.sql matches what the migrations generate."""

from __future__ import annotations

from hostdev.mgmt.persistence.database import offline_sql
from tests.support.project import ROOT


def test_schema_mysql_sql_has_not_drifted() -> None:
    """sql/schema-mysql.sql equals the offline SQL of the migrations for MySQL."""
    committed = (ROOT / "sql" / "schema-mysql.sql").read_text()
    assert committed == offline_sql("mysql+pymysql://"), (
        "sql/schema-mysql.sql is out of date: regenerate it with "
        "`hostdev-mgmt db schema > sql/schema-mysql.sql` and commit it"
    )


def test_offline_sql_also_renders_sqlite() -> None:
    """The migrations render for SQLite too (batch mode) and create the device table."""
    script = offline_sql("sqlite:///unused.db")
    assert "CREATE TABLE op_host_pci_devices" in script
    assert "AUTO_INCREMENT" not in script
