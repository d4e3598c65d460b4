"""db.url with several nodes: a node that does not answer is skipped, the next one serves."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from hostdev.mgmt.errors import ConfigError
from hostdev.mgmt.persistence.database import (
    DatabaseUnreachable,
    create_database_engine,
    current_revision,
    retry_reason,
    run_in_transaction,
)
from hostdev.mgmt.persistence.database_failover import split_urls
from tests.support.databases import head_revision

pytestmark = pytest.mark.mariadb

#: A node that refuses every connection (nothing listens on port 1).
DOWN = "mysql+pymysql://root@127.0.0.1:1/hostdev"


def _failovers() -> float:
    return REGISTRY.get_sample_value("hostdev_db_failovers_total") or 0.0


def test_first_node_down_the_next_one_serves(mariadb_url: str) -> None:
    """With the first node down, transactions run on the second and the failover is counted."""
    before = _failovers()
    engine = create_database_engine(f"{DOWN};{mariadb_url}")
    try:
        assert run_in_transaction(engine, lambda c: c.execute(text("SELECT 1")).scalar()) == 1
        assert _failovers() == before + 1
        assert current_revision(f"{DOWN};{mariadb_url}") == head_revision(mariadb_url)
    finally:
        engine.dispose()


def test_every_node_down_names_them() -> None:
    """When no node answers, the error says which URL and why (no traceback for operators)."""
    with pytest.raises(DatabaseUnreachable, match=r"127\.0\.0\.1:1/hostdev;.*127\.0\.0\.1:2/"):
        current_revision(f"{DOWN};mysql+pymysql://root@127.0.0.1:2/hostdev")


def test_several_urls_are_for_mariadb_only(tmp_path: object) -> None:
    """SQLite takes one URL: a list naming it is refused with what to do."""
    with pytest.raises(ConfigError, match="must all be mysql"):
        create_database_engine(f"sqlite:///{tmp_path}/a.db;{DOWN}")
    assert split_urls(" a ; b ;") == ["a", "b"]
    assert retry_reason(ValueError()) is None


def test_a_server_without_galera_keeps_its_reads(mariadb_url: str) -> None:
    """Causal reads are set on Galera nodes only: a plain server's sessions are as they were."""
    engine = create_database_engine(mariadb_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT @@wsrep_on")).scalar() in (0, "OFF")
            assert conn.execute(text("SELECT @@session.wsrep_sync_wait")).scalar() == 0
    finally:
        engine.dispose()
