"""The daemon's device allocation on MariaDB: the shared contract suite, plus lock races."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from hostdev.mgmt.devices.pci_devices import ClaimRaceLost, HeldDevice, claim_devices
from hostdev.mgmt.persistence.database import transaction
from hostdev.mgmt.persistence.unit_of_work import TxContext, UnitOfWork
from tests.support.databases import add_host, add_offering, add_vms
from tests.support.pci_device_contract import (
    STANDARD,
    ClaimPath,
    PciDeviceAllocationContract,
)

pytestmark = pytest.mark.mariadb


class TestPciDeviceAllocationOnMariaDb(PciDeviceAllocationContract):
    """Runs the allocation contract against MariaDB."""


def test_claim_skips_rows_locked_by_another_claim(engine: Engine) -> None:
    """A claim does not wait for, nor take, devices another open transaction is claiming."""
    repo = ClaimPath(engine)
    with transaction(engine) as conn:
        host = add_host(conn)
        vm_a, vm_b = add_vms(conn, add_offering(conn), 2)
    repo.reconcile(host, STANDARD)
    with transaction(engine) as first:
        mine = claim_devices(first, vm_a, host, {"GPU": 1})
        theirs = repo.claim(vm_b, host, {"GPU": 1})  # runs while `first` is open
        assert mine[0].id != theirs[0].id
        with pytest.raises(ClaimRaceLost) as caught, transaction(engine) as third:
            # One GPU is still free by the committed count, but locked: a lost race.
            claim_devices(third, vm_b, host, {"GPU": 1})
        assert caught.value.written == 0  # lost before writing: another host may be tried
    assert len(repo.devices_of(vm_a)) == 1


def test_lost_race_is_retried_in_a_new_transaction(engine: Engine) -> None:
    """The daemon's unit of work retries a ClaimRaceLost in a fresh transaction until it wins."""
    with transaction(engine) as conn:
        host = add_host(conn)
        (vm,) = add_vms(conn, add_offering(conn), 1)
    ClaimPath(engine).reconcile(host, STANDARD)
    attempts = []

    def work(tx: TxContext) -> tuple[HeldDevice, ...]:
        attempts.append(tx)
        if len(attempts) < 3:
            raise ClaimRaceLost("simulated")
        return claim_devices(tx.session.connection(), vm, host, {"10GE": 1})

    held = UnitOfWork(engine).run(work)
    assert len(held) == 1 and len(attempts) == 3


def test_mariadb_sessions_read_committed(engine: Engine) -> None:
    """Engines on MariaDB run READ COMMITTED, so claims take no gap locks."""
    with engine.connect() as conn:
        level = conn.exec_driver_sql("SELECT @@SESSION.tx_isolation").scalar()
    assert level == "READ-COMMITTED"
