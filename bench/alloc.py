"""Benchmarks hostdev's PCI claims against a raw PyMySQL loop on the same MariaDB, in one run.

Tables: 2,000 hosts with 50 devices each (100,000 devices, 5 names x 10) and
4,000 VMs, in a database of its own (``hostdev_bench_<random>``, dropped at
the end). One operation = claim one free device of a name on a host for a
VM, in its own transaction, then release it in another. Hosts, names and VMs
follow the same seeded random sequence on both sides.

Both sides do the same work, statement for statement, on the same tables;
each claim and each release writes its events to ``event_outbox`` (routing
key, type name, the event encoded with ``hostdev.messages.codec.encode``,
created_at) and keeps the new row's id, as a publication after commit needs.
The VM (id, uuid), the offering's requests and NUMA policy and, for a claim, the host's guid
are what the daemon has in hand from the deploy's first read and the
placement; a release starts from the VM alone.

- hostdev: the daemon's claim path: each operation a ``UnitOfWork``
  (a new transaction per attempt, lost races retried) running
  ``PciDeviceManager.claim`` as on Starting, then ``PciDeviceManager.release``
  as on Stopped.
- raw: the same by hand on one PyMySQL connection, lost races retried in a
  new transaction.

Per pair, on both sides (4 + 4 round trips):

- claim: ``SELECT id, host_id, name, domain, bus, slot, function, state ...
  WHERE host_id AND name AND state='free' ORDER BY id LIMIT 1 FOR UPDATE
  SKIP LOCKED``; ``UPDATE ... SET state='allocated', instance_id, updated_at
  WHERE id AND state='free'`` checked by row count; ``INSERT`` of the
  PciDeviceAllocated row (id from ``lastrowid``); COMMIT.
- release: ``SELECT`` of the VM's held or reserved devices with their
  host's guid (a scalar subquery) ``FOR UPDATE``; ``UPDATE ... SET
  state=CASE quarantined -> removed else free, instance_id=NULL,
  reserved_for=NULL, updated_at WHERE id IN (...) AND (instance_id=vm OR
  reserved_for=vm)`` checked by row count; ``INSERT`` of the
  PciDeviceReleased rows; COMMIT.

Figures: medians of 3 rounds, sequential and with 2 processes. Within a
round the sides alternate in slices of 200 pairs (with 2 processes, every
slice starts in both processes at once), so both share the machine's noise.
Prints a table, then ``metric=NAME value=NUMBER unit=UNIT`` lines; ratios
are hostdev/raw, the median of the rounds' ratios (goal >= 0.85).
Run: ``.venv/bin/python bench/alloc.py``.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import statistics
import sys
import time
from typing import Any

import pymysql
import scratch
import structlog
from sqlalchemy import make_url

from hostdev.messages.codec import encode
from hostdev.messages.events import PciDeviceAllocated, PciDeviceReleased
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import PciRequest
from hostdev.mgmt.persistence.database import create_database_engine
from hostdev.mgmt.persistence.models import VmInstance, utcnow
from hostdev.mgmt.persistence.unit_of_work import TxContext, UnitOfWork
from hostdev.mgmt.vms.vm_lifecycle import PciDeviceManager

HOSTS = 2_000
NAMES = ["10GE", "25GE", "GPU", "NVME", "FPGA"]
PER_NAME = 10
VMS = 4_000
OPERATIONS = 3_000  # claim+release pairs per process, side and round
SLICE = 200  # pairs per slice; the sides alternate slice by slice
ROUNDS = 3


def _connect(database: str | None = None) -> pymysql.connections.Connection[Any]:
    return pymysql.connect(unix_socket=scratch.MARIADB_SOCKET, user="root", database=database,
                           autocommit=False)


def populate(database: str) -> None:
    """Fills the (migrated) database with hosts, devices and VMs in bulk."""
    now = "2026-01-01 00:00:00"
    conn = _connect(database)
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO hosts (id, guid, name, status, cpus, memory_mb, hypervisor_version, "
            "created_at, updated_at) VALUES (%s, %s, %s, 'Up', 64, 262144, 'bench', %s, %s)",
            [(h, f"guid-{h}", f"host-{h}", now, now) for h in range(1, HOSTS + 1)],
        )
        cur.execute("INSERT INTO service_offerings (id, name, cpus, memory_mb, migration_policy,"
                    " created_at) VALUES (1, 'bench', 2, 2048, 'forbid', %s)", (now,))
        cur.executemany(
            "INSERT INTO vm_instances (id, uuid, name, offering_id, state, update_count, cpus, "
            "memory_mb, created_at, updated_at) VALUES (%s, %s, %s, 1, 'Stopped', 0, 2, 2048, "
            "%s, %s)",
            [(v, f"uuid-{v}", f"vm-{v}", now, now) for v in range(1, VMS + 1)],
        )
        rows = [
            (h, name, "0000", f"{0x10 + n:02x}", f"{i // 8:02x}", str(i % 8), now, now)
            for h in range(1, HOSTS + 1) for n, name in enumerate(NAMES) for i in range(PER_NAME)
        ]
        for start in range(0, len(rows), 10_000):
            cur.executemany(
                "INSERT INTO op_host_pci_devices (host_id, name, domain, bus, slot, `function`,"
                " vendor_id, product_id, state, created_at, updated_at) VALUES (%s, %s, %s, %s, "
                "%s, %s, '', '', 'free', %s, %s)",
                rows[start:start + 10_000],
            )
        cur.execute("ANALYZE TABLE op_host_pci_devices")
        cur.fetchall()
    conn.commit()
    conn.close()


def workload(seed: int, vms: list[int]) -> list[tuple[int, int, str]]:
    """Returns the (vm, host, name) sequence one process runs."""
    rng = random.Random(seed)
    return [(rng.choice(vms), rng.randint(1, HOSTS), rng.choice(NAMES)) for _ in range(OPERATIONS)]


_INSERT_EVENT = ("INSERT INTO event_outbox (routing_key, type, body, created_at) "
                 "VALUES (%s, %s, %s, %s)")


def _address(row: tuple[Any, ...]) -> PciAddress:
    """Returns the address of a device row (columns 3 to 6: domain, bus, slot, function)."""
    return PciAddress(f"{row[3]}:{row[4]}:{row[5]}.{row[6]}")


class Sides:
    """Both clients, connected once: hostdev's claim path and a raw PyMySQL connection."""

    def __init__(self, database: str) -> None:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
        self.engine = create_database_engine(scratch.mariadb_url(database))
        self.work = UnitOfWork(self.engine)
        self.devices = PciDeviceManager()
        self.work.run(lambda tx: tx.session.connection())  # pool it outside the timing
        self.raw = _connect(database)
        self.cursor = self.raw.cursor()
        # The daemon's isolation level (see create_database_engine).
        self.cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        self.outbox_ids: list[int] = []  # what a publication after commit would need

    def run(self, kind: str, ops: list[tuple[int, int, str]]) -> float:
        """Runs ``ops`` on one side; returns the seconds taken."""
        started = time.perf_counter()
        if kind == "hostdev":
            self.run_hostdev(ops)
        else:
            self.run_raw(ops)
        return time.perf_counter() - started

    def run_hostdev(self, ops: list[tuple[int, int, str]]) -> None:
        """Claims and releases through the daemon's unit of work and PciDeviceManager."""
        for vm_id, host, name in ops:
            vm = VmInstance(id=vm_id, uuid=f"uuid-{vm_id}", offering_id=1)
            requests = (PciRequest(name=name, count=1),)

            def claim(tx: TxContext, vm: VmInstance = vm, host: int = host,
                      requests: tuple[PciRequest, ...] = requests) -> None:
                tx.offering_requests[vm.offering_id] = requests
                tx.offering_numa[vm.offering_id] = "none"
                tx.host_guids[host] = f"guid-{host}"
                self.devices.claim(tx, vm, host)

            def release(tx: TxContext, vm: VmInstance = vm) -> None:
                self.devices.release(tx, vm)

            self.work.run(claim, what="claim")
            self.work.run(release, what="release")

    def run_raw(self, ops: list[tuple[int, int, str]]) -> None:
        """Claims and releases by hand: the same statements and outbox rows as the daemon."""
        conn = self.raw
        for vm, host, name in ops:
            while not self._claim_raw(vm, host, name):
                conn.rollback()  # a lost race retries in a new transaction
            conn.commit()
            while not self._release_raw(vm):
                conn.rollback()
            conn.commit()

    def _claim_raw(self, vm: int, host: int, name: str) -> bool:
        cur = self.cursor
        cur.execute(
            "SELECT id, host_id, name, domain, bus, slot, `function`, state "
            "FROM op_host_pci_devices WHERE host_id=%s AND name=%s AND state='free' "
            "ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED", (host, name))
        row = cur.fetchone()
        if row is None:  # every free one is locked by another claim
            return False
        now = utcnow()
        if cur.execute(
                "UPDATE op_host_pci_devices SET state='allocated', instance_id=%s, "
                "updated_at=%s WHERE id=%s AND state='free'", (vm, now, row[0])) != 1:
            return False
        guid = f"guid-{host}"
        event = PciDeviceAllocated(host_guid=guid, address=_address(row), name=row[2],
                                   vm_uuid=f"uuid-{vm}", at=now.isoformat() + "Z")
        cur.execute(_INSERT_EVENT, (f"pci.{guid}.Allocated", "PciDeviceAllocated",
                                    encode(event), now))
        self.outbox_ids.append(cur.lastrowid)
        return True

    def _release_raw(self, vm: int) -> bool:
        cur = self.cursor
        cur.execute(
            "SELECT d.id, d.host_id, d.name, d.domain, d.bus, d.slot, d.`function`, d.state, "
            "(SELECT h.guid FROM hosts h WHERE h.id=d.host_id) FROM op_host_pci_devices d "
            "WHERE d.instance_id=%s OR d.reserved_for=%s ORDER BY d.id FOR UPDATE", (vm, vm))
        rows = cur.fetchall()
        if not rows:
            return True
        now = utcnow()
        if cur.execute(
                "UPDATE op_host_pci_devices SET state=CASE WHEN state='quarantined' THEN "
                "'removed' ELSE 'free' END, instance_id=NULL, reserved_for=NULL, updated_at=%s "
                "WHERE id IN %s AND (instance_id=%s OR reserved_for=%s)",
                (now, [row[0] for row in rows], vm, vm)) != len(rows):
            return False
        at = now.isoformat() + "Z"
        events = []
        for row in rows:
            guid = row[8]
            event = PciDeviceReleased(host_guid=guid, address=_address(row), name=row[2],
                                      vm_uuid=f"uuid-{vm}", at=at)
            events.append((f"pci.{guid}.Released", "PciDeviceReleased", encode(event), now))
        # executemany sends one multi-row INSERT; lastrowid is its first row's id.
        cur.executemany(_INSERT_EVENT, events)
        self.outbox_ids.extend(range(cur.lastrowid, cur.lastrowid + len(events)))
        return True

    def close(self) -> None:
        """Closes both clients."""
        self.raw.close()
        self.engine.dispose()


def run_slices(database: str, ops: list[tuple[int, int, str]], barrier: Any = None
               ) -> list[tuple[str, float]]:
    """Runs ``ops`` in slices alternating raw and hostdev; returns (side, seconds) per slice.

    Alternating small slices (and, with ``barrier``, starting each slice in
    every process at once) makes both sides share the machine's noise.
    """
    sides = Sides(database)
    timings = []
    try:
        for number, start in enumerate(range(0, len(ops), SLICE)):
            chunk = ops[start:start + SLICE]
            order = ("raw", "hostdev") if number % 2 == 0 else ("hostdev", "raw")
            for kind in order:
                if barrier is not None:
                    barrier.wait()
                timings.append((kind, sides.run(kind, chunk)))
    finally:
        sides.close()
    return timings


def measure(database: str, processes: int, round_no: int) -> dict[str, float]:
    """Returns operations per second of each side with ``processes`` processes."""
    loads = [workload(1000 * round_no + p, list(range(p + 1, VMS + 1, processes)))
             for p in range(processes)]
    if processes == 1:
        per_process = [run_slices(database, loads[0])]
    else:
        context = mp.get_context("spawn")
        with context.Manager() as manager, context.Pool(processes) as pool:
            barrier = manager.Barrier(processes)
            jobs = [pool.apply_async(run_slices, (database, load, barrier)) for load in loads]
            per_process = [job.get(timeout=600) for job in jobs]
    seconds = {"raw": 0.0, "hostdev": 0.0}
    # Slices start together in every process: a slice lasts as long as its slowest.
    for slices in zip(*per_process, strict=True):
        seconds[slices[0][0]] += max(duration for _, duration in slices)
    return {kind: OPERATIONS * processes / total for kind, total in seconds.items()}


def main() -> int:
    """Creates the bench database, runs every round, prints the figures, drops it."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    with scratch.database("alloc") as db_url:
        database = make_url(db_url).database
        assert database is not None
        started = time.perf_counter()
        populate(database)
        print(f"populated {HOSTS} hosts, {HOSTS * len(NAMES) * PER_NAME} devices, {VMS} VMs "
              f"in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        results: dict[tuple[str, int], list[float]] = {}
        for round_no in range(ROUNDS):
            for processes in (1, 2):
                rates = measure(database, processes, round_no)
                for kind, rate in rates.items():
                    results.setdefault((kind, processes), []).append(rate)
                    print(f"round {round_no + 1}: {kind} x{processes}: {rate:,.0f} ops/s",
                          file=sys.stderr)

    medians = {key: statistics.median(rates) for key, rates in results.items()}
    lines = []
    print(f"{'claim+release per second':<28}{'hostdev':>10}{'raw PyMySQL':>13}{'ratio':>8}")
    for processes, label in ((1, "sequential"), (2, "2_processes")):
        ours, raw = medians[("hostdev", processes)], medians[("raw", processes)]
        # The ratio of each round (same slices, same noise), then their median.
        ratio = statistics.median(
            h / r for h, r in zip(results[("hostdev", processes)], results[("raw", processes)],
                                  strict=True))
        print(f"{label:<28}{ours:>10,.0f}{raw:>13,.0f}{ratio:>8.2f}")
        lines += [
            f"metric=alloc_claim_release_{label}_hostdev value={ours:.0f} unit=ops/s",
            f"metric=alloc_claim_release_{label}_raw value={raw:.0f} unit=ops/s",
            f"metric=alloc_claim_release_{label}_ratio value={ratio:.2f} unit=ratio",
        ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
