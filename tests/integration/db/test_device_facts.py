"""The device table's fact columns on MariaDB: what reconciliation stores, read back raw."""

from __future__ import annotations

from sqlalchemy import Engine

from hostdev.messages.pci_address import PciAddress as P
from hostdev.messages.values import PciDeviceInfo
from hostdev.mgmt.devices.pci_inventory import reconcile_inventory
from hostdev.mgmt.persistence.database import transaction
from tests.support.databases import add_host


def test_the_fact_columns_hold_what_the_agent_reports(engine: Engine) -> None:
    """Names, class, NUMA node, group members, PF/VF and driver land in their columns."""
    vf = PciDeviceInfo(
        address=P("5e:02.1"), name="vf", vendor_id="0x8086", product_id="0x154c",
        iommu_group=61, vendor="Intel Corporation", product="X710 Virtual Function",
        class_code=0x020000, numa_node=1, iommu_members=(P("5e:02.0"), P("5e:02.1")),
        physical_function=P("5e:00.0"), driver="vfio-pci")
    pf = PciDeviceInfo(address=P("5e:00.0"), name="pf", numa_node=0,
                       virtual_functions=tuple(P(f"5e:02.{n}") for n in range(8)))
    with transaction(engine) as conn:
        host_id = add_host(conn, name="facts-host")
        reconcile_inventory(conn, host_id, [vf, pf])
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT name, vendor, product, class_code, numa_node, iommu_members, "
            "physical_function, virtual_functions, driver, reason "
            f"FROM op_host_pci_devices WHERE host_id = {host_id} ORDER BY name").all()
    assert [tuple(r) for r in rows] == [
        ("pf", "", "", 0, 0, "", None, ",".join(f"0000:5e:02.{n}" for n in range(8)), "", ""),
        ("vf", "Intel Corporation", "X710 Virtual Function", 0x020000, 1,
         "0000:5e:02.0,0000:5e:02.1", "0000:5e:00.0", "", "vfio-pci", ""),
    ]


def test_a_changed_fact_is_updated_on_the_next_report(engine: Engine) -> None:
    """A device moved to another NUMA node and driver is updated, not inserted again."""
    before = PciDeviceInfo(address=P("3b:00.0"), name="GPU", numa_node=0, driver="nouveau")
    after = PciDeviceInfo(address=P("3b:00.0"), name="GPU", numa_node=1, driver="vfio-pci")
    with transaction(engine) as conn:
        host_id = add_host(conn, name="facts-host-2")
        reconcile_inventory(conn, host_id, [before])
    with transaction(engine) as conn:
        reconcile_inventory(conn, host_id, [after])
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT numa_node, driver, state FROM op_host_pci_devices "
            f"WHERE host_id = {host_id}").all()
    assert [tuple(r) for r in rows] == [(1, "vfio-pci", "free")]
