"""Creates hosts, PCI devices, offerings, VMs, jobs, handled messages and the outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# Types are spelled out here, not imported from the models: a migration must
# keep meaning what it meant when it was written.
MYSQL_OPTIONS = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def timestamp() -> sa.types.TypeEngine[object]:
    """Returns a DateTime with microseconds on MariaDB/MySQL."""
    fsp6 = mysql.DATETIME(fsp=6)
    return sa.DateTime().with_variant(fsp6, "mariadb").with_variant(fsp6, "mysql")


def upgrade() -> None:
    """Creates every table and index of the first release."""
    op.create_table(
        "event_outbox",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("routing_key", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("published_at", timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_outbox")),
        **MYSQL_OPTIONS,
    )
    op.create_index(
        op.f("ix_event_outbox_published_at_id"), "event_outbox", ["published_at", "id"]
    )

    op.create_table(
        "handled_messages",
        sa.Column("message_id", sa.String(length=64), nullable=False),
        sa.Column("handled_at", timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("message_id", name=op.f("pk_handled_messages")),
        **MYSQL_OPTIONS,
    )
    op.create_index(op.f("ix_handled_messages_handled_at"), "handled_messages", ["handled_at"])

    op.create_table(
        "hosts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("guid", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("last_ping", timestamp(), nullable=True),
        sa.Column("cpus", sa.Integer(), nullable=False),
        sa.Column("memory_mb", sa.BigInteger(), nullable=False),
        sa.Column("hypervisor_version", sa.String(length=64), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("updated_at", timestamp(), nullable=False),
        sa.CheckConstraint(
            "status IN ('Up', 'Disconnected', 'Down', 'Maintenance')",
            name=op.f("ck_hosts_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hosts")),
        sa.UniqueConstraint("guid", name=op.f("uq_hosts_guid")),
        **MYSQL_OPTIONS,
    )

    op.create_table(
        "service_offerings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("cpus", sa.Integer(), nullable=False),
        sa.Column("memory_mb", sa.BigInteger(), nullable=False),
        sa.Column("migration_policy", sa.String(length=16), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.CheckConstraint(
            "migration_policy IN ('forbid', 'detach-attach')",
            name=op.f("ck_service_offerings_migration_policy"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_offerings")),
        sa.UniqueConstraint("name", name=op.f("uq_service_offerings_name")),
        **MYSQL_OPTIONS,
    )

    op.create_table(
        "service_offering_pci_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("offering_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "count > 0", name=op.f("ck_service_offering_pci_requests_count_positive")
        ),
        sa.ForeignKeyConstraint(
            ["offering_id"], ["service_offerings.id"],
            name=op.f("fk_service_offering_pci_requests_offering_id"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_offering_pci_requests")),
        sa.UniqueConstraint(
            "offering_id", "name", name=op.f("uq_service_offering_pci_requests_offering_id_name")
        ),
        **MYSQL_OPTIONS,
    )

    op.create_table(
        "vm_instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uuid", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("offering_id", sa.Integer(), nullable=False),
        sa.Column("host_id", sa.Integer(), nullable=True),
        sa.Column("last_host_id", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("update_count", sa.BigInteger(), nullable=False),
        sa.Column("cpus", sa.Integer(), nullable=False),
        sa.Column("memory_mb", sa.BigInteger(), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("updated_at", timestamp(), nullable=False),
        sa.CheckConstraint(
            "state IN ('Stopped', 'Starting', 'Running', 'Stopping', 'Migrating', 'Destroyed', "
            "'Error')",
            name=op.f("ck_vm_instances_state"),
        ),
        sa.ForeignKeyConstraint(["host_id"], ["hosts.id"], name=op.f("fk_vm_instances_host_id")),
        sa.ForeignKeyConstraint(
            ["last_host_id"], ["hosts.id"], name=op.f("fk_vm_instances_last_host_id")
        ),
        sa.ForeignKeyConstraint(
            ["offering_id"], ["service_offerings.id"], name=op.f("fk_vm_instances_offering_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vm_instances")),
        sa.UniqueConstraint("uuid", name=op.f("uq_vm_instances_uuid")),
        **MYSQL_OPTIONS,
    )
    op.create_index(op.f("ix_vm_instances_host_id_state"), "vm_instances", ["host_id", "state"])
    op.create_index(op.f("ix_vm_instances_last_host_id"), "vm_instances", ["last_host_id"])
    op.create_index(op.f("ix_vm_instances_offering_id"), "vm_instances", ["offering_id"])

    op.create_table(
        "jobs",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("vm_id", sa.Integer(), nullable=True),
        sa.Column("step", sa.String(length=64), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("claimed_by", sa.String(length=64), nullable=True),
        sa.Column("deadline", timestamp(), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("updated_at", timestamp(), nullable=False),
        sa.Column("finished_at", timestamp(), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'running', 'succeeded', 'failed')", name=op.f("ck_jobs_state")
        ),
        sa.ForeignKeyConstraint(["vm_id"], ["vm_instances.id"], name=op.f("fk_jobs_vm_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        **MYSQL_OPTIONS,
    )
    op.create_index(op.f("ix_jobs_state_deadline"), "jobs", ["state", "deadline"])
    op.create_index(op.f("ix_jobs_vm_id"), "jobs", ["vm_id"])

    op.create_table(
        "op_host_pci_devices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("host_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("domain", sa.String(length=4), nullable=False),
        sa.Column("bus", sa.String(length=2), nullable=False),
        sa.Column("slot", sa.String(length=2), nullable=False),
        sa.Column("function", sa.String(length=1), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=True),
        sa.Column("reserved_for", sa.Integer(), nullable=True),
        sa.Column("vendor_id", sa.String(length=8), nullable=False),
        sa.Column("product_id", sa.String(length=8), nullable=False),
        sa.Column("iommu_group", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("updated_at", timestamp(), nullable=False),
        sa.CheckConstraint(
            "state IN ('free', 'allocated', 'reserved', 'quarantined', 'disabled', 'removed')",
            name=op.f("ck_op_host_pci_devices_state"),
        ),
        sa.ForeignKeyConstraint(
            ["host_id"], ["hosts.id"], name=op.f("fk_op_host_pci_devices_host_id")
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["vm_instances.id"], name=op.f("fk_op_host_pci_devices_instance_id")
        ),
        sa.ForeignKeyConstraint(
            ["reserved_for"], ["vm_instances.id"],
            name=op.f("fk_op_host_pci_devices_reserved_for"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_op_host_pci_devices")),
        sa.UniqueConstraint(
            "host_id", "domain", "bus", "slot", "function",
            name=op.f("uq_op_host_pci_devices_host_id_domain_bus_slot_function"),
        ),
        **MYSQL_OPTIONS,
    )
    # Claims: free devices of one name on one host; per-host counts.
    op.create_index(
        op.f("ix_op_host_pci_devices_host_id_name_state"),
        "op_host_pci_devices", ["host_id", "name", "state"],
    )
    # Placement: grouped free counts per host and name over all hosts.
    op.create_index(
        op.f("ix_op_host_pci_devices_state_name_host_id"),
        "op_host_pci_devices", ["state", "name", "host_id"],
    )
    # Releases, commits and aborts: every device a VM holds or reserved.
    op.create_index(
        op.f("ix_op_host_pci_devices_instance_id"), "op_host_pci_devices", ["instance_id"]
    )
    op.create_index(
        op.f("ix_op_host_pci_devices_reserved_for"), "op_host_pci_devices", ["reserved_for"]
    )


def downgrade() -> None:
    """Drops everything, children first."""
    for table in (
        "op_host_pci_devices",
        "jobs",
        "vm_instances",
        "service_offering_pci_requests",
        "service_offerings",
        "hosts",
        "handled_messages",
        "event_outbox",
    ):
        op.drop_table(table)
