"""Alembic migrations on both back ends: upgrade to head matches the models exactly."""

from __future__ import annotations

import json
from datetime import datetime

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from hostdev.mgmt.persistence.database import (
    alembic_config,
    create_database_engine,
    current_revision,
)
from hostdev.mgmt.persistence.models import Base
from hostdev.mgmt.placement import blocks
from tests.support.databases import head_revision


def test_upgrade_head_leaves_nothing_for_autogenerate(empty_url: str) -> None:
    """After `upgrade head`, autogenerate finds no difference from the models."""
    command.upgrade(alembic_config(empty_url), "head")
    assert current_revision(empty_url) == head_revision(empty_url)
    engine = create_database_engine(empty_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_downgrade_base_drops_everything(empty_url: str) -> None:
    """Downgrading to base removes every table but Alembic's, and upgrading again works."""
    config = alembic_config(empty_url)
    command.upgrade(config, "head")
    command.downgrade(config, "base")
    engine = create_database_engine(empty_url)
    try:
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()
    command.upgrade(config, "head")
    assert current_revision(empty_url) == head_revision(empty_url)


def test_upgrade_0003_moves_correlation_ids_out_of_payloads(empty_url: str) -> None:
    """Jobs written before 0003 find their answer and their request by the new columns."""
    config = alembic_config(empty_url)
    command.upgrade(config, "0002")
    engine = create_database_engine(empty_url)
    payloads = {
        1: ("start", "start", {"command_id": "outbox-7", "request": "req-1", "tried": []}),
        2: ("migrate", "attach", {"command_id": "outbox-8", "attach_id": "outbox-9"}),
        3: ("attach-devices", "attach", {"attach_id": "outbox-10", "request": "req-3"}),
        4: ("stop", "done", {}),
    }
    try:
        with engine.begin() as conn:
            for job_id, (kind, step, payload) in payloads.items():
                conn.execute(text(
                    "INSERT INTO jobs (id, kind, state, step, details, payload, created_at, "
                    "updated_at) VALUES (:id, :kind, 'running', :step, '', :payload, "
                    ":now, :now)"), {"id": job_id, "kind": kind, "step": step,
                                     "payload": json.dumps(payload), "now": datetime(2026, 1, 1)})
        command.upgrade(config, "head")
        with engine.connect() as conn:
            rows = {job_id: (command_id, request_id) for job_id, command_id, request_id
                    in conn.execute(text("SELECT id, command_id, request_id FROM jobs"))}
        assert rows == {1: ("outbox-7", "req-1"), 2: ("outbox-9", None),
                        3: ("outbox-10", "req-3"), 4: (None, None)}
    finally:
        engine.dispose()


def test_upgrade_0004_keeps_answers_to_earlier_commands_acceptable(empty_url: str) -> None:
    """A command sent before 0004 keeps its id, and its job waits on the host it went to."""
    config = alembic_config(empty_url)
    command.upgrade(config, "0003")
    engine = create_database_engine(empty_url)
    now = datetime(2026, 1, 1)
    try:
        with engine.begin() as conn:
            for row_id, key in ((7, "agent.host-a.StartCommand"), (8, "vm.v1.Starting")):
                conn.execute(text(
                    "INSERT INTO event_outbox (id, routing_key, type, body, created_at) "
                    "VALUES (:id, :key, 'T', :body, :now)"),
                    {"id": row_id, "key": key, "body": b"{}", "now": now})
            for job_id, state, command_id in ((1, "running", "outbox-7"),
                                              (2, "running", "outbox-99"),
                                              (3, "succeeded", "outbox-7")):
                conn.execute(text(
                    "INSERT INTO jobs (id, kind, state, step, details, payload, command_id, "
                    "created_at, updated_at) VALUES (:id, 'start', :state, 'start', '', '{}', "
                    ":command_id, :now, :now)"),
                    {"id": job_id, "state": state, "command_id": command_id, "now": now})
        command.upgrade(config, "head")
        with engine.connect() as conn:
            ids = dict(conn.execute(text("SELECT id, message_id FROM event_outbox")).all())
            hosts = dict(conn.execute(text("SELECT id, command_host FROM jobs")).all())
        assert ids == {7: "outbox-7", 8: None}  # a command's id is stored, an event's needs none
        assert hosts == {1: "host-a", 2: None, 3: None}  # unknown command; finished job
    finally:
        engine.dispose()


def test_upgrade_0007_keeps_reasons_and_admits_the_new_states(empty_url: str) -> None:
    """A disabled device keeps its reason after 0007, and the new states pass the CHECK."""
    config = alembic_config(empty_url)
    command.upgrade(config, "0006")
    engine = create_database_engine(empty_url)
    now = datetime(2026, 1, 1)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO hosts (id, guid, name, status, cpus, memory_mb, hypervisor_version,"
                " created_at, updated_at) VALUES (1, 'g1', 'h1', 'Up', 4, 4096, '', :now, :now)"),
                {"now": now})
            for device_id, function, state, reason in ((1, "0", "disabled", "fan noise"),
                                                       (2, "1", "free", "")):
                conn.execute(text(
                    "INSERT INTO op_host_pci_devices (id, host_id, name, domain, bus, slot, "
                    "function, vendor_id, product_id, state, disabled_reason, created_at, "
                    "updated_at) VALUES (:id, 1, '10GE', '0000', '28', '00', :function, '', '',"
                    " :state, :reason, :now, :now)"),
                    {"id": device_id, "function": function, "state": state, "reason": reason,
                     "now": now})
        command.upgrade(config, "head")
        with engine.begin() as conn:
            conn.execute(text("UPDATE op_host_pci_devices SET state = 'unavailable' WHERE id = 2"))
            rows = conn.execute(text(
                "SELECT id, state, reason, withheld FROM op_host_pci_devices ORDER BY id")).all()
        assert [tuple(row) for row in rows] == [(1, "disabled", "fan noise", ""),
                                                (2, "unavailable", "", "")]
    finally:
        engine.dispose()


def test_0009_admits_preparing_hosts_and_its_downgrade_keeps_them_out_of_placement(
        empty_url: str) -> None:
    """After 0009 a host may prepare for maintenance; the downgrade makes it Maintenance."""
    config = alembic_config(empty_url)
    command.upgrade(config, "0008")
    engine = create_database_engine(empty_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO hosts (id, guid, name, status, cpus, memory_mb, hypervisor_version,"
                " created_at, updated_at) VALUES (1, 'g1', 'h1', 'Maintenance', 4, 4096, '', "
                ":now, :now)"), {"now": datetime(2026, 1, 1)})
        command.upgrade(config, "0009")
        with engine.begin() as conn:
            assert tuple(conn.execute(text(
                "SELECT status, status_reason, reset_on_release FROM hosts")).one()) == (
                "Maintenance", "", False)
            conn.execute(text("UPDATE hosts SET status = 'PrepareForMaintenance', "
                              "status_reason = 'VM web1 forbids migration'"))
        command.downgrade(config, "0008")
        with engine.begin() as conn:
            assert conn.execute(text("SELECT status FROM hosts")).scalar_one() == "Maintenance"
    finally:
        engine.dispose()


def test_0012_fills_used_capacity_from_the_vms_holding_it(empty_url: str) -> None:
    """After 0012 each host's ``used_*`` are the sums over its Starting, Running, Stopping
    and Migrating VMs; its ``updated_at`` is kept; the downgrade drops the columns."""
    config = alembic_config(empty_url)
    command.upgrade(config, "0011")
    engine = create_database_engine(empty_url)
    now = datetime(2026, 1, 1)
    try:
        with engine.begin() as conn:
            for host_id in (1, 2, 3):
                conn.execute(text(
                    "INSERT INTO hosts (id, guid, name, status, cpus, memory_mb, "
                    "hypervisor_version, created_at, updated_at) VALUES (:id, :guid, :guid, "
                    "'Up', 32, 65536, '', :now, :now)"),
                    {"id": host_id, "guid": f"h{host_id}", "now": now})
            conn.execute(text(
                "INSERT INTO service_offerings (id, name, cpus, memory_mb, migration_policy, "
                "created_at) VALUES (1, 'o', 1, 1024, 'forbid', :now)"), {"now": now})
            vms = [(1, 1, "Running", 2, 2048), (2, 1, "Stopping", 1, 512),
                   (3, 1, "Error", 4, 4096), (4, 2, "Migrating", 3, 1024),
                   (5, 2, "Starting", 1, 256), (6, None, "Stopped", 8, 8192),
                   (7, None, "Destroyed", 8, 8192)]
            for vm_id, host_id, state, cpus, memory in vms:
                conn.execute(text(
                    "INSERT INTO vm_instances (id, uuid, name, offering_id, host_id, state, "
                    "update_count, cpus, memory_mb, created_at, updated_at) VALUES (:id, :uuid,"
                    " :uuid, 1, :host, :state, 0, :cpus, :memory, :now, :now)"),
                    {"id": vm_id, "uuid": f"vm{vm_id}", "host": host_id, "state": state,
                     "cpus": cpus, "memory": memory, "now": now})
        command.upgrade(config, "0012")
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, used_cpus, used_memory_mb, updated_at = :now "
                                     "FROM hosts ORDER BY id"), {"now": now}).all()
            indexes = {ix["name"] for ix in inspect(conn).get_indexes("hosts")}
        assert [tuple(row) for row in rows] == [(1, 3, 2560, 1), (2, 4, 1280, 1), (3, 0, 0, 1)]
        assert "ix_hosts_status_id_cpus_used_cpus_memory_mb_used_memory_mb" in indexes
        command.downgrade(config, "0011")
        with engine.connect() as conn:
            columns = {c["name"] for c in inspect(conn).get_columns("hosts")}
        assert not {"used_cpus", "used_memory_mb"} & columns
    finally:
        engine.dispose()


def test_0013_gives_every_block_with_hosts_every_cell_and_a_tightening_sets_them(
        empty_url: str) -> None:
    """After 0013 each block of 256 host ids that has hosts claims every cell (a bound too
    high: the search reads its hosts, misses none); the first tightening sets them from the
    Up hosts; the downgrade drops the table."""
    config = alembic_config(empty_url)
    command.upgrade(config, "0012")
    engine = create_database_engine(empty_url)
    now = datetime(2026, 1, 1)
    try:
        with engine.begin() as conn:
            for host_id, status in ((1, "Up"), (2, "Down"), (300, "Down"), (1000, "Up")):
                conn.execute(text(
                    "INSERT INTO hosts (id, guid, name, status, cpus, memory_mb, used_cpus, "
                    "used_memory_mb, hypervisor_version, created_at, updated_at) VALUES (:id, "
                    ":guid, :guid, :status, 32, 65536, 30, 0, '', :now, :now)"),
                    {"id": host_id, "guid": f"h{host_id}", "status": status, "now": now})
        command.upgrade(config, "0013")
        every = blocks.ALL_CELLS
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT block, cells FROM host_blocks ORDER BY block")).all()
        assert [tuple(row) for row in rows] == [(0, every), (1, every), (3, every)]
        with engine.begin() as conn:
            assert blocks.tighten(conn, 0) == 4  # after the last block read
            rows = conn.execute(text("SELECT block, cells FROM host_blocks ORDER BY block")).all()
        up = blocks.cell(2, 65536)
        assert [tuple(row) for row in rows] == [(0, up), (1, 0), (3, up)]
        command.downgrade(config, "0012")
        with engine.connect() as conn:
            assert "host_blocks" not in inspect(conn).get_table_names()
    finally:
        engine.dispose()
