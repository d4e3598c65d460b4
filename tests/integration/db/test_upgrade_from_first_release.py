"""A database written at the first schema revision keeps every row when upgraded to head."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, select, text
from sqlalchemy.orm import Session

from hostdev.mgmt.jobs import payloads
from hostdev.mgmt.persistence.database import (
    alembic_config,
    create_database_engine,
    current_revision,
)
from hostdev.mgmt.persistence.models import Job, PciDevice, VmInstance

T0 = datetime(2026, 11, 25, 9, 30, 0, 123456)
#: The first release's rows, as its code wrote them (raw SQL: the models are at head).
ROWS: dict[str, list[dict[str, Any]]] = {
    "hosts": [
        {"id": 1, "guid": "guid-src", "name": "kvm-01", "status": "Up", "last_ping": T0,
         "cpus": 32, "memory_mb": 131072, "hypervisor_version": "9.0.0"},
        {"id": 2, "guid": "guid-dst", "name": "kvm-03", "status": "Up", "last_ping": T0,
         "cpus": 32, "memory_mb": 131072, "hypervisor_version": "9.0.0"},
        {"id": 3, "guid": "guid-old", "name": "kvm-09", "status": "Down", "last_ping": None,
         "cpus": 8, "memory_mb": 16384, "hypervisor_version": "8.0.0"},
    ],
    "service_offerings": [
        {"id": 1, "name": "net-2x10ge", "cpus": 2, "memory_mb": 2048,
         "migration_policy": "detach-attach"},
        {"id": 2, "name": "gpu-1", "cpus": 4, "memory_mb": 8192, "migration_policy": "forbid"},
    ],
    "service_offering_pci_requests": [
        {"id": 1, "offering_id": 1, "name": "10GE", "count": 2},
        {"id": 2, "offering_id": 2, "name": "GPU", "count": 1},
    ],
    "vm_instances": [
        {"id": 1, "uuid": "00000000-0000-4000-8000-000000000001", "name": "web-1",
         "offering_id": 1, "host_id": 1, "last_host_id": None, "state": "Migrating",
         "update_count": 3, "cpus": 2, "memory_mb": 2048},
        {"id": 2, "uuid": "00000000-0000-4000-8000-000000000002", "name": "ml-1",
         "offering_id": 2, "host_id": 2, "last_host_id": 1, "state": "Running",
         "update_count": 5, "cpus": 4, "memory_mb": 8192},
        {"id": 3, "uuid": "00000000-0000-4000-8000-000000000003", "name": "web-2",
         "offering_id": 1, "host_id": None, "last_host_id": 1, "state": "Stopped",
         "update_count": 4, "cpus": 2, "memory_mb": 2048},
    ],
    "op_host_pci_devices": [
        # web-1 holds its source pair and has the destination pair reserved: mid-migration.
        {"id": 1, "host_id": 1, "name": "10GE", "domain": "0000", "bus": "28", "slot": "00",
         "function": "0", "instance_id": 1, "reserved_for": None, "state": "allocated",
         "iommu_group": 20},
        {"id": 2, "host_id": 1, "name": "10GE", "domain": "0000", "bus": "28", "slot": "00",
         "function": "1", "instance_id": 1, "reserved_for": None, "state": "allocated",
         "iommu_group": 20},
        {"id": 3, "host_id": 2, "name": "10GE", "domain": "0000", "bus": "86", "slot": "00",
         "function": "0", "instance_id": None, "reserved_for": 1, "state": "reserved",
         "iommu_group": 20},
        {"id": 4, "host_id": 2, "name": "10GE", "domain": "0000", "bus": "86", "slot": "00",
         "function": "1", "instance_id": None, "reserved_for": 1, "state": "reserved",
         "iommu_group": 20},
        {"id": 5, "host_id": 2, "name": "GPU", "domain": "0000", "bus": "d8", "slot": "00",
         "function": "0", "instance_id": 2, "reserved_for": None, "state": "allocated",
         "iommu_group": 40},
        {"id": 6, "host_id": 1, "name": "GPU", "domain": "0000", "bus": "3b", "slot": "00",
         "function": "0", "instance_id": None, "reserved_for": None, "state": "free",
         "iommu_group": 41},
        {"id": 7, "host_id": 1, "name": "10GE", "domain": "0000", "bus": "3d", "slot": "00",
         "function": "0", "instance_id": None, "reserved_for": None, "state": "disabled",
         "iommu_group": None},
        {"id": 8, "host_id": 3, "name": "10GE", "domain": "0000", "bus": "5e", "slot": "00",
         "function": "0", "instance_id": None, "reserved_for": None, "state": "removed",
         "iommu_group": 60},
    ],
    "jobs": [
        {"id": 7, "kind": "migrate", "state": "running", "vm_id": 1, "step": "migrate",
         "details": "", "claimed_by": None, "deadline": T0 + timedelta(minutes=5),
         "finished_at": None,
         "payload": json.dumps({
             "version": 1, "command_id": "outbox-42", "request": "req-7",
             "source": "guid-src", "source_id": 1, "source_name": "kvm-01",
             "destination": "guid-dst", "destination_id": 2, "destination_name": "kvm-03",
             "mapping": [["10GE", "0000:28:00.0", "0000:86:00.0"],
                         ["10GE", "0000:28:00.1", "0000:86:00.1"]]})},
        {"id": 8, "kind": "stop", "state": "succeeded", "vm_id": 3, "step": "done",
         "details": "stopped", "claimed_by": None, "deadline": None,
         "finished_at": T0, "payload": json.dumps({"version": 1, "host": "guid-src"})},
    ],
    "handled_messages": [{"message_id": "req-7", "handled_at": T0}],
    "event_outbox": [{"id": 1, "routing_key": "vm.00000000-0000-4000-8000-000000000001."
                      "Migrating", "type": "VmStateChanged", "body": b'{"type":"VmStateChanged"}',
                      "created_at": T0, "published_at": None}],
}
#: Columns the first release filled itself when the code did not.
_DEFAULTS = {"hosts": ("created_at", "updated_at"), "service_offerings": ("created_at",),
             "vm_instances": ("created_at", "updated_at"), "jobs": ("created_at", "updated_at"),
             "op_host_pci_devices": ("created_at", "updated_at", "vendor_id", "product_id")}


def _fill(conn: Connection) -> None:
    for table, rows in ROWS.items():
        for row in rows:
            values = dict(row)
            for column in _DEFAULTS.get(table, ()):
                values.setdefault(column, "0x8086" if column.endswith("_id") else T0)
            names = ", ".join(values)
            conn.execute(text(f"INSERT INTO {table} ({names}) VALUES "
                              f"({', '.join(':' + n for n in values)})"), values)


def _snapshot(engine: Engine, columns: dict[str, list[str]]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, reading only the columns the first revision had."""
    with engine.connect() as conn:
        return {table: [tuple(row) for row in conn.execute(text(
                    f"SELECT {', '.join(names)} FROM {table} ORDER BY {names[0]}"))]
                for table, names in columns.items()}


def test_a_populated_first_release_database_upgrades_to_head_intact(empty_url: str) -> None:
    """Hosts, devices, allocations and a running migration survive 0001 -> head, still usable."""
    config = alembic_config(empty_url)
    first = ScriptDirectory.from_config(config).get_base()
    head = ScriptDirectory.from_config(config).get_current_head()
    assert first is not None and head != first
    command.upgrade(config, first)
    engine = create_database_engine(empty_url)
    try:
        with engine.begin() as conn:
            _fill(conn)
            columns = {table: [c["name"] for c in inspect(conn).get_columns(table)]
                       for table in ROWS}
        before = _snapshot(engine, columns)
        assert sum(len(rows) for rows in before.values()) == sum(map(len, ROWS.values()))
        engine.dispose()  # SQLite's batch migrations rebuild tables: no connection left open

        command.upgrade(config, "head")
        assert current_revision(empty_url) == head
        assert _snapshot(engine, columns) == before

        with Session(engine) as session:
            job = session.get(Job, 7)
            assert job is not None and (job.command_id, job.request_id) == ("outbox-42", "req-7")
            migration = payloads.load(job, payloads.MigratePayload)
            assert (migration.source, migration.destination) == ("guid-src", "guid-dst")
            assert [m.job_id for m in payloads.migrations_of(session, "guid-dst")] == [7]
            held = session.scalars(select(PciDevice.id).where(PciDevice.instance_id == 1)
                                   .order_by(PciDevice.id)).all()
            reserved = session.scalars(select(PciDevice.id).where(PciDevice.reserved_for == 1)
                                       .order_by(PciDevice.id)).all()
            assert (held, reserved) == ([1, 2], [3, 4])
            vm = session.get(VmInstance, 1)
            assert vm is not None and (vm.state, vm.update_count) == ("Migrating", 3)
    finally:
        engine.dispose()
