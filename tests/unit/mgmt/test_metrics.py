"""Management metrics: metrics.port, and an inventory scrape without a usable database."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine

from hostdev.messages.runtime.properties import parse_properties
from hostdev.mgmt.config import MgmtConfig, config_from_properties
from hostdev.mgmt.errors import ConfigError
from hostdev.mgmt.metrics import InventoryCollector


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
