"""The PCI device lifecycle as a hypothesis state machine, checked against a model.

Runs on SQLite (one writer, so no races: the races are the MariaDB
concurrency test's job); examples are kept modest for a 2-core machine.
``removed`` devices are kept as rows but are not part of a host's total: the
total is the devices in the inventory, i.e. reported ones plus quarantined.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine, select

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import PciDeviceInfo
from hostdev.mgmt.devices.device_admin import DeviceBusy
from hostdev.mgmt.devices.pci_devices import InsufficientDevices
from hostdev.mgmt.persistence.database import create_database_engine, transaction
from hostdev.mgmt.persistence.models import PciDevice
from tests.support.databases import add_host, add_offering, add_vms, sqlite_database
from tests.support.pci_device_contract import ClaimPath

# A small world (3 devices per host, 2 VMs) so random steps often meet
# the same device twice: claim it, remove it, release it, re-add it.
ADDRESSES = tuple(PciAddress(a) for a in ("10:00.0", "10:00.1", "11:00.0"))
NAMES = ("A", "B")
HOSTS = st.sampled_from([0, 1])
VMS = st.sampled_from([0, 1])
DEVICE = st.sampled_from(range(len(ADDRESSES)))


@dataclass
class ModelDevice:
    """What the database should say about one device."""

    name: str
    present: bool = True
    disabled: bool = False
    holder: int | None = None
    reserved_for: int | None = None

    @property
    def state(self) -> str:
        """Derives the expected state from presence, admin flag and holders."""
        if not self.present:
            return "quarantined" if self.holder or self.reserved_for else "removed"
        if self.disabled:
            return "disabled"
        if self.holder:
            return "allocated"
        return "reserved" if self.reserved_for else "free"


class DeviceLifecycle(RuleBasedStateMachine):
    """Claims, releases, migrations, inventory changes and admin changes on two hosts."""

    engine: ClassVar[Engine]

    def __init__(self) -> None:
        super().__init__()
        self.repo = ClaimPath(self.engine)
        with transaction(self.engine) as conn:
            self.hosts = [add_host(conn), add_host(conn)]
            self.vms = add_vms(conn, add_offering(conn), 2)
        self.model = {
            (host, address): ModelDevice(NAMES[i % 2])
            for host in self.hosts for i, address in enumerate(ADDRESSES)
        }
        for host in self.hosts:
            self.repo.reconcile(host, self._reported(host))
        self.rows_ever = len(self.model)

    def _reported(self, host: int) -> list[PciDeviceInfo]:
        return [PciDeviceInfo(address=address, name=device.name)
                for (h, address), device in self.model.items() if h == host and device.present]

    def _device_id(self, host: int, address: PciAddress) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(PciDevice.id).where(
                PciDevice.host_id == host, PciDevice.domain == f"{address.domain:04x}",
                PciDevice.bus == f"{address.bus:02x}", PciDevice.slot == f"{address.slot:02x}",
                PciDevice.function == f"{address.function:x}")).scalar_one())

    def _take(self, vm: int, host: int, name: str, count: int, *, reserve: bool) -> None:
        free = [k for k, d in self.model.items()
                if k[0] == host and d.name == name and d.state == "free"]
        operation = self.repo.reserve if reserve else self.repo.claim
        if len(free) < count:
            with pytest.raises(InsufficientDevices):
                operation(vm, host, {name: count})
            return
        held = operation(vm, host, {name: count})
        assert len(held) == count
        for device in held:
            expected = self.model[(host, device.address)]
            assert expected.state == "free" and expected.name == name
            if reserve:
                expected.reserved_for = vm
            else:
                expected.holder = vm

    @rule(vm=VMS, host=HOSTS, name=st.sampled_from(NAMES), count=st.integers(1, 2))
    def claim(self, vm: int, host: int, name: str, count: int) -> None:
        """Claims devices for a VM."""
        self._take(self.vms[vm], self.hosts[host], name, count, reserve=False)

    @rule(vm=VMS, host=HOSTS, name=st.sampled_from(NAMES), count=st.integers(1, 2))
    def reserve(self, vm: int, host: int, name: str, count: int) -> None:
        """Reserves a migration's destination devices for a VM."""
        self._take(self.vms[vm], self.hosts[host], name, count, reserve=True)

    @rule(vm=VMS, host=HOSTS)
    def release(self, vm: int, host: int) -> None:
        """Releases everything a VM holds or reserved on a host."""
        vm_id, host_id = self.vms[vm], self.hosts[host]
        mine = [d for (h, _), d in self.model.items()
                if h == host_id and vm_id in (d.holder, d.reserved_for)]
        assert self.repo.release(vm_id, host_id) == len(mine)
        for device in mine:
            device.holder = device.reserved_for = None

    @rule(vm=VMS, source=HOSTS)
    def commit(self, vm: int, source: int) -> None:
        """Commits a migration from ``source`` to the other host."""
        vm_id, src, dst = self.vms[vm], self.hosts[source], self.hosts[1 - source]
        reserved = [d for (h, _), d in self.model.items() if h == dst and d.reserved_for == vm_id]
        assert self.repo.commit_migration(vm_id, src, dst) == len(reserved)
        for (h, _), device in self.model.items():
            if h == src and device.holder == vm_id:
                device.holder = None
        for device in reserved:
            device.holder, device.reserved_for = vm_id, None

    def _reservations(self) -> list[tuple[int, int]]:
        return sorted({(d.reserved_for, h) for (h, _), d in self.model.items() if d.reserved_for})

    @precondition(lambda self: self._reservations())
    @rule(data=st.data(), success=st.booleans())
    def finish_a_migration(self, data: st.DataObject, success: bool) -> None:
        """Commits or aborts a migration that has reserved devices."""
        vm_id, dst = data.draw(st.sampled_from(self._reservations()))
        vm, source = self.vms.index(vm_id), 1 - self.hosts.index(dst)
        if success:
            self.commit(vm, source)
        else:
            self.abort(vm, 1 - source)

    @rule(vm=VMS, host=HOSTS)
    def abort(self, vm: int, host: int) -> None:
        """Aborts a migration to ``host``."""
        vm_id, host_id = self.vms[vm], self.hosts[host]
        reserved = [d for (h, _), d in self.model.items()
                    if h == host_id and d.reserved_for == vm_id]
        assert self.repo.abort_migration(vm_id, host_id) == len(reserved)
        for device in reserved:
            device.reserved_for = None

    @rule(host=HOSTS, index=DEVICE)
    def remove_from_inventory(self, host: int, index: int) -> None:
        """The agent stops reporting a device."""
        device = self.model[(self.hosts[host], ADDRESSES[index])]
        device.present, device.disabled = False, False
        self.repo.reconcile(self.hosts[host], self._reported(self.hosts[host]))

    def _held(self) -> list[tuple[int, PciAddress]]:
        return sorted(k for k, d in self.model.items()
                      if d.present and (d.holder or d.reserved_for))

    @precondition(lambda self: self._held())
    @rule(data=st.data())
    def remove_a_held_device(self, data: st.DataObject) -> None:
        """The agent stops reporting a device a VM holds or reserved (it is quarantined)."""
        host, address = data.draw(st.sampled_from(self._held()))
        self.model[(host, address)].present = False
        self.repo.reconcile(host, self._reported(host))
        assert self.model[(host, address)].state == "quarantined"

    @precondition(lambda self: any(not d.present for d in self.model.values()))
    @rule(data=st.data())
    def re_add_a_missing_device(self, data: st.DataObject) -> None:
        """The agent reports again a device it had stopped reporting."""
        missing = sorted(k for k, d in self.model.items() if not d.present)
        host, address = data.draw(st.sampled_from(missing))
        self.model[(host, address)].present = True
        self.repo.reconcile(host, self._reported(host))

    @rule(host=HOSTS, index=DEVICE)
    def add_to_inventory(self, host: int, index: int) -> None:
        """The agent reports a device (again)."""
        self.model[(self.hosts[host], ADDRESSES[index])].present = True
        self.repo.reconcile(self.hosts[host], self._reported(self.hosts[host]))

    @rule(host=HOSTS, index=DEVICE)
    def rename(self, host: int, index: int) -> None:
        """The operator renames a reported device in pci.devices."""
        device = self.model[(self.hosts[host], ADDRESSES[index])]
        if device.present:
            device.name = NAMES[1 - NAMES.index(device.name)]
            self.repo.reconcile(self.hosts[host], self._reported(self.hosts[host]))

    @rule(host=HOSTS, index=DEVICE)
    def disable(self, host: int, index: int) -> None:
        """The operator disables a device; only a free (or disabled) one may be."""
        device = self.model[(self.hosts[host], ADDRESSES[index])]
        device_id = self._device_id(self.hosts[host], ADDRESSES[index])
        if device.state in ("free", "disabled"):
            assert self.repo.disable(device_id) == "disabled"
            device.disabled = True
        else:
            with pytest.raises(DeviceBusy):
                self.repo.disable(device_id)

    @rule(host=HOSTS, index=DEVICE)
    def enable(self, host: int, index: int) -> None:
        """The operator enables a device; a no-op unless it is disabled."""
        device = self.model[(self.hosts[host], ADDRESSES[index])]
        device.disabled = False
        device_id = self._device_id(self.hosts[host], ADDRESSES[index])
        assert self.repo.enable(device_id) == device.state

    def _rows(self) -> list[PciDevice]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(PciDevice).where(PciDevice.host_id.in_(self.hosts))))

    @invariant()
    def rows_match_the_model(self) -> None:
        """Every device's state, name and holders are what the model expects."""
        for row in self._rows():
            address = PciAddress(f"{row.domain}:{row.bus}:{row.slot}.{row.function}")
            device = self.model[(row.host_id, address)]
            assert (row.state, row.name) == (device.state, device.name), address
            assert (row.instance_id, row.reserved_for) == (device.holder, device.reserved_for)

    @invariant()
    def a_device_has_at_most_one_vm(self) -> None:
        """No device is both held and reserved, nor held without being allocated or quarantined."""
        for row in self._rows():
            assert row.instance_id is None or row.reserved_for is None
            if row.state in ("free", "disabled", "removed"):
                assert row.instance_id is None and row.reserved_for is None

    @invariant()
    def no_device_is_ever_deleted(self) -> None:
        """Rows are never deleted, so an allocated device never disappears."""
        assert len(self._rows()) == self.rows_ever

    @invariant()
    def counts_add_up(self) -> None:
        """Per host, free+allocated+reserved+quarantined+disabled = reported + quarantined."""
        for host in self.hosts:
            counts = self.repo.counts(host)
            total = sum(c.free + c.allocated + c.reserved + c.quarantined + c.disabled
                        for c in counts)
            expected = [d for (h, _), d in self.model.items()
                        if h == host and (d.present or d.state == "quarantined")]
            assert total == sum(c.total for c in counts) == len(expected)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """Opens a migrated SQLite file for the state machine's examples."""
    folder: Path = tmp_path_factory.mktemp("lifecycle")
    with sqlite_database(folder) as url:
        engine = create_database_engine(url)
        yield engine
        engine.dispose()


def test_device_lifecycle_keeps_its_invariants(engine: Engine) -> None:
    """Any sequence of lifecycle operations keeps the rows equal to the model."""
    DeviceLifecycle.engine = engine
    run_state_machine_as_test(
        DeviceLifecycle, settings=settings(max_examples=40, stateful_step_count=30)
    )
