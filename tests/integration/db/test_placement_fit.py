"""On MariaDB, placement's SQL search finds exactly the hosts its verdicts accept."""

from __future__ import annotations

from hypothesis import given, settings
from sqlalchemy import Connection, Engine, delete, insert, select
from sqlalchemy.orm import Session

from hostdev.messages.values import PciRequest
from hostdev.mgmt.persistence.models import Host, PciDevice, VmInstance, utcnow
from hostdev.mgmt.placement import planner, search
from tests.support.databases import raise_blocks
from tests.support.placement_worlds import World, load, search_and_verdicts, worlds


@settings(max_examples=40, deadline=None)
@given(world=worlds())
def test_search_finds_exactly_the_hosts_explain_accepts(engine: Engine, world: World) -> None:
    """``find_hosts`` and ``explain`` agree on MariaDB's SQL too (binary names, its planner)."""
    load(engine, world)
    found, fits = search_and_verdicts(engine, world, limit=len(world.hosts) + 1)
    assert found == fits


@settings(max_examples=80, deadline=None)
@given(world=worlds(numa="required"))
def test_search_and_explain_agree_on_numa_required(engine: Engine, world: World) -> None:
    """On MariaDB too, ``required`` keeps exactly the hosts with one NUMA node that fits."""
    load(engine, world)
    found, fits = search_and_verdicts(engine, world, limit=len(world.hosts) + 1)
    assert found == fits


def test_a_page_reads_the_device_index_as_a_range(engine: Engine) -> None:
    """A page after host N starts its index read at N (``range``), not at the name's first row."""
    now = utcnow()
    with engine.begin() as conn:
        for table in (PciDevice, VmInstance, Host):
            conn.execute(delete(table))
        conn.execute(insert(Host), [
            {"id": n, "guid": f"page-{n}", "name": f"page-{n}", "status": "Down", "cpus": 8,
             "memory_mb": 8192, "hypervisor_version": "", "created_at": now, "updated_at": now}
            for n in range(1, 2001)])
        conn.execute(insert(PciDevice), [
            {"host_id": n, "name": "GPU", "domain": "0000", "bus": "3b", "slot": "00",
             "function": str(f), "vendor_id": "", "product_id": "", "state": "free",
             "created_at": now, "updated_at": now}
            for n in range(1, 2001) for f in range(4)])
        conn.exec_driver_sql("ANALYZE TABLE hosts, op_host_pci_devices")
    params = {"cpus": 1, "memory_mb": 1, "name_0": "GPU", "count_0": 1, "after": 1500}
    page = search._page_search(1, 0, 5, False)._statement  # its SQL, explained
    sql = page.params(**params).compile(engine, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        plan = conn.exec_driver_sql(f"EXPLAIN {sql}").mappings().all()
        found = find_hosts_after(conn, params)
    devices = [row for row in plan if row["table"] == "op_host_pci_devices"]
    assert [(row["type"], row["key"]) for row in devices] == [
        ("range", "ix_op_host_pci_devices_state_name_host_id")]
    assert found == list(range(1501, 1565))  # the page: the next 64 hosts after 1500


def find_hosts_after(conn: Connection, params: dict[str, object]) -> list[int]:
    """Returns the host ids of the page after ``params['after']``."""
    page = search._page()  # the page itself
    return [int(n) for n in conn.execute(select(page.c.host_id), params).scalars()]


def test_the_host_search_skips_refused_hosts_as_a_range_of_the_host_index(
        engine: Engine) -> None:
    """After a refused page, Down hosts are one skipped range and short ones are refused on
    the index entry: the search reads the host index as a range, never the table in id order."""
    now = utcnow()
    statuses = {1: "Down", 2: "Maintenance", 3: "Up"}  # 3: Up but short of CPU
    with engine.begin() as conn:
        for table in (PciDevice, VmInstance, Host):
            conn.execute(delete(table))
        conn.execute(insert(Host), [
            {"id": n, "guid": f"hs-{n}", "name": f"hs-{n}",
             "status": statuses.get(n % 4, "Up") if n <= 1500 else "Up",
             "cpus": 2 if n % 4 == 3 and n <= 1500 else 8, "used_cpus": 1,
             "memory_mb": 8192, "used_memory_mb": 1024, "hypervisor_version": "",
             "created_at": now, "updated_at": now} for n in range(1, 2001)])
        conn.execute(insert(PciDevice), [
            {"host_id": n, "name": "GPU", "domain": "0000", "bus": "3b", "slot": "00",
             "function": "0", "vendor_id": "", "product_id": "",
             "state": "free" if n % 4 or n > 1500 else "allocated",
             "created_at": now, "updated_at": now} for n in range(1, 2001)])
        raise_blocks(conn)  # as the hosts' registrations would
        conn.exec_driver_sql("ANALYZE TABLE hosts, op_host_pci_devices")
    params: dict[str, object] = {"cpus": 4, "memory_mb": 1024, "name_0": "GPU", "count_0": 1,
                                 "after": 64}
    assert search.ranges([0, 1, 3], 64, params) == 1023  # hosts 65 to 511, 768 to 1,023
    assert [params[f"{b}_{i}"] for i in range(search.RANGES) for b in ("low", "high")] == [
        64, 511, 767, 1023, 1023, 1023, 1023, 1023]
    sql = search._host_search(1, 0, 5, False)._statement.params(**params).compile(
        engine, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        plan = conn.exec_driver_sql(f"EXPLAIN {sql}").mappings().all()
    hosts = [row for row in plan if row["table"] == "hosts"]
    assert [(row["type"], row["key"]) for row in hosts] == [("range", search.HOST_INDEX)]
    demand = planner.Demand(cpus=4, memory_mb=1024, pci=(PciRequest(name="GPU", count=1),))
    with Session(engine) as session:  # the page (hosts 1-85) is refused: the search finds 1501
        assert [c.id for c in planner.find_hosts(session, demand)] == list(range(1501, 1506))
