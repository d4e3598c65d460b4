"""The hardware rules on MariaDB: the shared contract, and PF/VF claims racing in two threads."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import Engine

from hostdev.mgmt.devices.pci_devices import InsufficientDevices
from hostdev.mgmt.persistence.database import transaction
from tests.support.databases import add_host, add_offering, add_vms
from tests.support.device_rules_contract import DeviceRulesContract, device
from tests.support.pci_device_contract import ClaimPath

pytestmark = pytest.mark.mariadb

ROUNDS = 40


class TestDeviceRulesOnMariaDb(DeviceRulesContract):
    """Runs the hardware rules contract against MariaDB."""


def test_a_pf_and_its_vf_claimed_at_once_never_both_succeed(engine: Engine) -> None:
    """Two threads claiming a PF and its VF together: exactly one wins, every round."""
    repo = ClaimPath(engine)
    with transaction(engine) as conn:
        host = add_host(conn)
        vm_pf, vm_vf = add_vms(conn, add_offering(conn), 2)
    repo.reconcile(host, [device("5e:00.0", "PF", 60), device("5e:02.0", "VF", 61, pf="5e:00.0")])
    start = threading.Barrier(2)

    def claim(vm: int, name: str) -> bool:
        start.wait(timeout=10)
        try:
            repo.claim(vm, host, {name: 1})
        except InsufficientDevices:
            return False
        return True

    with ThreadPoolExecutor(2) as pool:
        for _ in range(ROUNDS):
            pf, vf = pool.submit(claim, vm_pf, "PF"), pool.submit(claim, vm_vf, "VF")
            outcome = (pf.result(timeout=30), vf.result(timeout=30))
            held = {d.name for vm in (vm_pf, vm_vf) for d in repo.devices_of(vm)}
            assert outcome in ((True, False), (False, True)), outcome
            assert held == ({"PF"} if outcome[0] else {"VF"})
            repo.release(vm_pf)
            repo.release(vm_vf)
