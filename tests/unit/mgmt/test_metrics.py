"""Management metrics: metrics.port, overdue jobs, and a scrape without a usable database."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert

from hostdev.messages.runtime.properties import parse_properties
from hostdev.mgmt.config import MgmtConfig, config_from_properties
from hostdev.mgmt.errors import ConfigError
from hostdev.mgmt.metrics import InventoryCollector
from hostdev.mgmt.persistence.database import create_database_engine, transaction
from hostdev.mgmt.persistence.models import Job, utcnow
from tests.support.databases import sqlite_database


def _config(text: str) -> MgmtConfig:
    return config_from_properties(parse_properties(text, "mgmt.properties"))


def test_metrics_port_is_off_by_default_and_parsed() -> None:
    """No key or ``off`` serves nothing; a port is an int; anything else names the line."""
    assert _config("").metrics_port is None
    assert _config("metrics.port=off\n").metrics_port is None
    assert _config("metrics.port=9465\n").metrics_port == 9465
    with pytest.raises(ConfigError, match=r"mgmt.properties:2: .*a TCP port from 1 to 65535"):
        _config("\nmetrics.port=70000\n")


def test_inventory_scrape_survives_a_broken_database(tmp_path: Path) -> None:
    """A database without the schema gives hostdev_inventory_up 0 and no counts."""
    engine = create_engine(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    try:
        families = list(InventoryCollector(engine).collect())
    finally:
        engine.dispose()
    assert [f.name for f in families] == ["hostdev_inventory_up"]
    assert families[0].samples[0].value == 0


def test_inventory_counts_running_jobs_past_their_deadline(tmp_path: Path) -> None:
    """hostdev_jobs_overdue counts running jobs whose deadline passed, by kind, and no others."""
    now = utcnow()
    with sqlite_database(tmp_path) as url:
        engine = create_database_engine(url)
        try:
            with transaction(engine) as conn:
                conn.execute(insert(Job), [
                    {"kind": "migrate", "state": "running", "deadline": now - timedelta(minutes=5)},
                    {"kind": "migrate", "state": "running", "deadline": now - timedelta(seconds=1)},
                    {"kind": "deploy", "state": "running", "deadline": now + timedelta(minutes=5)},
                    {"kind": "stop", "state": "failed", "deadline": now - timedelta(minutes=5)},
                ])
            families = {f.name: f for f in InventoryCollector(engine).collect()}
        finally:
            engine.dispose()
    overdue = families["hostdev_jobs_overdue"]
    assert [(s.labels, s.value) for s in overdue.samples] == [({"kind": "migrate"}, 2)]
