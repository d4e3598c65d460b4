"""Four processes claim and release on one MariaDB: no device is ever held twice."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter

import pytest
from sqlalchemy import Engine, select

from hostdev.mgmt.persistence.database import transaction
from hostdev.mgmt.persistence.models import PciDevice
from tests.support.allocation_load import find_double_holds, run_claim_release_load
from tests.support.databases import add_host, add_offering, add_vms
from tests.support.pci_device_contract import ClaimPath, inventory

pytestmark = [pytest.mark.mariadb, pytest.mark.slow]

PROCESSES = 4
OPERATIONS_PER_PROCESS = 5_000
VMS_PER_PROCESS = 10
NAMES = ["10GE", "GPU", "NVME"]
DEVICES_PER_NAME = 6


def test_concurrent_claims_never_double_allocate(mariadb_url: str, engine: Engine) -> None:
    """Under 4 competing processes every claim is exclusive, kept, and the counts add up."""
    repo = ClaimPath(engine)
    with transaction(engine) as conn:
        hosts = [add_host(conn), add_host(conn)]
        vms = add_vms(conn, add_offering(conn), PROCESSES * VMS_PER_PROCESS)
    specs = [f"{bus:02x}:00.{fn}|{name}" for bus, name in enumerate(NAMES, start=0x20)
             for fn in range(DEVICES_PER_NAME)]
    for host in hosts:
        repo.reconcile(host, inventory(*specs))

    context = multiprocessing.get_context("spawn")
    started = time.monotonic()
    with context.Pool(PROCESSES) as pool:
        jobs = [
            pool.apply_async(run_claim_release_load, (
                mariadb_url, vms[i::PROCESSES], hosts, NAMES, OPERATIONS_PER_PROCESS, i))
            for i in range(PROCESSES)
        ]
        reports = [job.get(timeout=120) for job in jobs]
    elapsed = time.monotonic() - started

    assert sum(r.operations for r in reports) >= 20_000
    assert sum(r.claims for r in reports) > 1_000 and sum(r.insufficient for r in reports) > 0
    assert find_double_holds([i for r in reports for i in r.intervals]) == []

    believed = {}
    for report in reports:
        for vm, (_host, devices) in report.holdings.items():
            believed.update(dict.fromkeys(devices, vm))
    with engine.connect() as conn:
        rows = conn.execute(select(PciDevice.id, PciDevice.host_id, PciDevice.name,
                                   PciDevice.state, PciDevice.instance_id)
                            .where(PciDevice.host_id.in_(hosts))).all()
    in_db = {row.id: row.instance_id for row in rows if row.instance_id is not None}
    assert in_db == believed  # every successful claim still held, nothing else held
    assert {row.state for row in rows if row.id in in_db} <= {"allocated"}
    held = Counter((row.host_id, row.name) for row in rows if row.instance_id is not None)
    for count in repo.counts():
        if count.host_id in hosts:
            assert count.free + count.allocated == count.total == DEVICES_PER_NAME
            assert count.allocated == held[(count.host_id, count.name)]
    print(f"{sum(r.operations for r in reports)} operations in {elapsed:.1f} s")  # speed: bench/
