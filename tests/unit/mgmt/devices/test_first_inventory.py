"""A new host's first inventory, ruled before its rows exist: the columns it writes."""

from __future__ import annotations

from datetime import datetime

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import PciDeviceInfo
from hostdev.mgmt.devices.device_rows import address_columns, fact_columns
from hostdev.mgmt.devices.pci_inventory import (
    INVENTORY_COLUMNS,
    ROW_COLUMNS,
    FirstInventory,
    index_reported,
)


def test_a_first_inventory_writes_every_column_a_device_row_stores() -> None:
    """The columns of a first inventory are the name, address, facts, state and reason."""
    info = PciDeviceInfo(address=PciAddress("28:00.0"), name="10GE")
    stored = {"name", *address_columns(PciAddress("28:00.0")), *fact_columns(info),
              "state", "reason"}
    assert set(INVENTORY_COLUMNS) == stored
    assert len(INVENTORY_COLUMNS) == len(stored)


def test_a_first_inventory_rows_each_device_by_the_rules() -> None:
    """A withheld device is unavailable with the agent's reason; the others free; flag set."""
    reported = (PciDeviceInfo(address=PciAddress("29:00.0"), name="GPU", iommu_group=3,
                              withheld="its group has 29:00.1"),
                PciDeviceInfo(address=PciAddress("28:00.0"), name="10GE", iommu_group=2))
    inventory = FirstInventory.of(index_reported("host g1", reported))
    now = datetime(2026, 1, 1)
    rows = [dict(zip(ROW_COLUMNS, row, strict=True)) for row in inventory.rows(5, now)]
    assert [(r["host_id"], r["bus"], r["state"], r["reason"]) for r in rows] == [
        (5, "28", "free", ""), (5, "29", "unavailable", "its group has 29:00.1")]
    assert inventory.rules
    assert all(r["created_at"] == r["updated_at"] == now for r in rows)
