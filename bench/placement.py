"""Benchmarks placement (``find_hosts``) when many hosts are refused while having free devices.

Tables, in a database of its own (``hostdev_bench_<random>``, dropped at the
end), written with multi-row INSERTs: N hosts with 4 free ``GPU`` and 4
free ``NIC`` devices each (NUMA nodes 0 and 1), one Running VM of 2 CPUs and
2 GiB on every host. The demand is 4 CPUs, 8 GiB and 1 x GPU.

- ``half refused``: the first N/2 hosts by id are refused while having free
  GPUs, a quarter each Down, in Maintenance, short of CPU (4 CPUs, 2 held)
  and short of memory (8 GiB, 2 held); the last N/2 fit. First fit by id
  meets every refused host before the first that fits: the worst case.
- ``all fit``: every host fits (the common case, for comparison).
- ``full behind refused`` (with ``--layouts``): 256 refused hosts with free
  devices, then N/2 Up hosts with room whose devices are all disabled (full),
  then hosts that fit: the case the host search pays one device lookup per
  full host for (docs/database.md).
- ``half refused untightened`` (with ``--layouts``): half refused, but every
  block of placement's blocks claims every cell, as right after the upgrade
  to revision 0013 or when every host filled up since the last tightening:
  what a bound too high costs until the daemons tighten it.

Placement's blocks are written as the hosts' registrations and their VMs'
starts leave them (each block the cells of its Up hosts).

Each layout is timed over ``QUERIES`` calls of ``find_hosts`` (each in its
own transaction, after a warm-up), alternating plain, NUMA ``required`` and
two-name demands. Prints a table, then ``metric=NAME value=NUMBER unit=ms``
lines. ``--explain`` prints MariaDB's ``EXPLAIN`` and what ``ANALYZE`` measured of the
three reads at 10,000 hosts, half refused.
Run: ``.venv/bin/python bench/placement.py [--explain] [--hosts 1000,10000,100000]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import pymysql
import scratch
from sqlalchemy import make_url
from sqlalchemy.orm import Session

from hostdev.messages.values import PciRequest
from hostdev.mgmt.persistence.database import create_database_engine
from hostdev.mgmt.placement import blocks
from hostdev.mgmt.placement.blocks import _FITTING
from hostdev.mgmt.placement.planner import Demand, find_hosts
from hostdev.mgmt.placement.search import BLOCKS, _host_search, _page_search, ranges

DEVICES = {"GPU": 4, "NIC": 4}
DEMANDS = [Demand(cpus=4, memory_mb=8192, pci=(PciRequest(name="GPU", count=1),)),
           Demand(cpus=4, memory_mb=8192, pci=(PciRequest(name="GPU", count=2),),
                  numa="required"),
           Demand(cpus=4, memory_mb=8192,
                  pci=(PciRequest(name="GPU", count=1), PciRequest(name="NIC", count=1)))]
QUERIES = 300
#: Layout -> (refused hosts, full hosts after them), for N hosts.
LAYOUTS = {"half refused": lambda n: (n // 2, 0), "all fit": lambda n: (0, 0),
           "half refused untightened": lambda n: (n // 2, 0),
           "full behind refused": lambda n: (256, n // 2)}
BATCH = 2_000  # rows per INSERT
NOW = "2026-01-01 00:00:00"


def _host(index: int, refused: bool) -> tuple[Any, ...]:
    kind = index % 4 if refused else -1
    status = {0: "Down", 1: "Maintenance"}.get(kind, "Up")
    cpus = 4 if kind == 2 else 64
    memory = 8192 if kind == 3 else 262_144
    # Its one Running VM holds 2 CPUs and 2 GiB (used_cpus, used_memory_mb).
    return (index, f"guid-{index}", f"host-{index}", status, cpus, memory, 2, 2048, "", NOW,
            NOW)


def _insert(cursor: Any, table: str, columns: str, rows: list[tuple[Any, ...]]) -> None:
    marks = "(" + ", ".join(["%s"] * len(rows[0])) + ")"
    for start in range(0, len(rows), BATCH):
        chunk = rows[start:start + BATCH]
        cursor.execute(f"INSERT INTO {table} ({columns}) VALUES "
                       + ", ".join([marks] * len(chunk)), [v for row in chunk for v in row])


def populate(url: str, hosts: int, refused: int, full: int = 0, *,
             untightened: bool = False) -> None:
    """Writes ``hosts`` hosts, the first ``refused`` of them refused, the next ``full`` of them
    without a free device (see the module's text)."""
    parsed = make_url(url)
    with pymysql.connect(unix_socket=scratch.MARIADB_SOCKET, user="root",
                         database=parsed.database, autocommit=False) as db, db.cursor() as cursor:
        cursor.execute("INSERT INTO service_offerings (id, name, cpus, memory_mb, "
                       "migration_policy, created_at) VALUES (1, 'bench', 2, 2048, 'forbid', %s)",
                       (NOW,))
        rows = [_host(i, i <= refused) for i in range(1, hosts + 1)]
        _insert(cursor, "hosts", "id, guid, name, status, cpus, memory_mb, used_cpus, "
                "used_memory_mb, hypervisor_version, created_at, updated_at", rows)
        # Placement's blocks, as the hosts' registrations and their VMs' starts leave them.
        cells: dict[int, int] = {}
        for host_id, _, _, status, cpus, memory, used_cpus, used_memory, *_ in rows:
            if status == "Up":
                cells[blocks.block_of(host_id)] = (cells.get(blocks.block_of(host_id), 0)
                                                   | blocks.cell(cpus - used_cpus,
                                                                 memory - used_memory))
        if untightened:  # every block claims every cell, as right after the upgrade
            cells = dict.fromkeys(cells, blocks.ALL_CELLS)
        _insert(cursor, "host_blocks", "block, cells, raised",
                [(block, bits, 0) for block, bits in cells.items()])
        _insert(cursor, "vm_instances", "id, uuid, name, offering_id, host_id, state, "
                "update_count, cpus, memory_mb, created_at, updated_at",
                [(i, f"vm-{i}", f"vm-{i}", 1, i, "Running", 0, 2, 2048, NOW, NOW)
                 for i in range(1, hosts + 1)])
        devices = [(i, name, "0000", f"{i // 256 % 256:02x}", f"{slot:02x}", "0", "10de", "1eb8",
                    "disabled" if refused < i <= refused + full else "free", slot % 2, NOW, NOW)
                   for i in range(1, hosts + 1)
                   for slot, name in enumerate(n for n, k in DEVICES.items() for _ in range(k))]
        # Host ids above 65,535 share buses: the domain keeps addresses unique.
        devices = [(h, n, f"{h // 65_536:04x}", *rest) for h, n, _, *rest in devices]
        _insert(cursor, "op_host_pci_devices", "host_id, name, domain, bus, slot, `function`, "
                "vendor_id, product_id, state, numa_node, created_at, updated_at", devices)
        db.commit()
        cursor.execute("ANALYZE TABLE hosts, vm_instances, op_host_pci_devices")


def time_searches(url: str, expect_first: int) -> list[float]:
    """Returns the milliseconds of ``QUERIES`` searches; checks each finds host ``expect_first``."""
    engine = create_database_engine(url)
    timings: list[float] = []
    try:
        for index in range(QUERIES + 10):
            demand = DEMANDS[index % len(DEMANDS)]
            with Session(engine) as session, session.begin():
                start = time.perf_counter()
                found = find_hosts(session, demand)
                elapsed = (time.perf_counter() - start) * 1000
            if not found or found[0].id != expect_first:
                raise SystemExit(f"wrong answer for {demand}: {found[:1]}, "
                                 f"expected host {expect_first}")
            if index >= 10:
                timings.append(elapsed)
    finally:
        engine.dispose()
    return timings


def measure(hosts: int, layout: str) -> list[float]:
    """Builds a world of ``hosts`` hosts in ``layout`` and times its searches (ms)."""
    refused, full = LAYOUTS[layout](hosts)
    with scratch.database("placement") as url:
        populate(url, hosts, refused, full, untightened="untightened" in layout)
        return time_searches(url, refused + full + 1)


def p50_p99(timings: list[float]) -> tuple[float, float]:
    """Returns the median and the 99th percentile of some timings."""
    ordered = sorted(timings)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]


def _tables(plan: Any) -> Iterator[dict[str, Any]]:
    """Yields every ``table`` object of an ``ANALYZE FORMAT=JSON`` plan, outer first."""
    if isinstance(plan, dict):
        if "table" in plan:
            yield plan["table"]
        for value in plan.values():
            yield from _tables(value)
    elif isinstance(plan, list):
        for value in plan:
            yield from _tables(value)


def explain(url: str) -> None:
    """Prints ``EXPLAIN`` and what ``ANALYZE`` measured of the three reads for the first demand.

    The device page (after host 0), the blocks after the page's last host
    (64: the page is refused), the host search over the blocks they name.
    """
    engine = create_database_engine(url)
    demand = DEMANDS[0]
    params: dict[str, object] = {"cpus": demand.cpus, "memory_mb": demand.memory_mb,
                                 "name_0": "GPU", "count_0": 1, "after": 0, "first": 0,
                                 "want": blocks.wanted(demand.cpus, demand.memory_mb),
                                 "count": BLOCKS}
    with engine.connect() as connection:
        ranges(blocks.fitting(connection, 64, blocks.wanted(demand.cpus, demand.memory_mb),
                              BLOCKS), 64, params)
    for title, statement, more in (
            ("device page", _page_search(len(demand.pci), 0, 5, False)._statement, {}),
            ("blocks", _FITTING._statement, {"first": blocks.block_of(65)}),
            ("host search", _host_search(len(demand.pci), 0, 5, False)._statement, {})):
        query = statement.params(**params | more).compile(
            dialect=engine.dialect, compile_kwargs={"literal_binds": True})
        print(f"-- {title}\n{query}")
        with engine.connect() as connection:
            raw = connection.connection.driver_connection
            assert raw is not None
            with raw.cursor() as cursor:
                cursor.execute(f"EXPLAIN {query}")
                for row in cursor.fetchall():
                    print(row)
                cursor.execute(f"ANALYZE FORMAT=JSON {query}")
                plan = json.loads(cursor.fetchone()[0])
                for table in _tables(plan):
                    print("ANALYZE", {key: table.get(key) for key in (
                        "table_name", "access_type", "key", "r_rows", "r_filtered",
                        "r_table_time_ms")})
    engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="1000,10000,100000")
    parser.add_argument("--explain", action="store_true")
    parser.add_argument("--layouts", default="half refused,all fit",
                        help=f"comma-separated, of: {', '.join(LAYOUTS)}")
    args = parser.parse_args()
    if args.explain:
        with scratch.database("placement") as url:
            populate(url, 10_000, 5_000)
            explain(url)
        return 0
    results: dict[tuple[int, str], list[float]] = {}
    for hosts in [int(n) for n in args.hosts.split(",")]:
        for layout in args.layouts.split(","):
            results[(hosts, layout)] = measure(hosts, layout)
            p50, p99 = p50_p99(results[(hosts, layout)])
            print(f"{hosts:>7} hosts  {layout:<12}  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms",
                  flush=True)
    for (hosts, layout), timings in results.items():
        p50, p99 = p50_p99(timings)
        # The names: the half-refused layout is the one the goals are for.
        slug = "_" + layout.replace(" ", "_")
        print(f"metric=placement_p50_ms_{hosts}_hosts{slug} value={p50:.2f} unit=ms")
        print(f"metric=placement_p99_ms_{hosts}_hosts{slug} value={p99:.2f} unit=ms")
        if layout == "half refused" and hosts == 100_000:
            print(f"metric=placement_p99_ms_100000_hosts value={p99:.2f} unit=ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
