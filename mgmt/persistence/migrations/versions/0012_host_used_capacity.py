"""Keeps on each host the CPUs and memory its VMs hold, for placement's indexed search.

Adds ``hosts.used_cpus`` and ``hosts.used_memory_mb`` (the sums over the
host's VMs in Starting, Running, Stopping or Migrating, kept by
``hostdev.mgmt.vms.capacity``), fills them from the VMs there now, and the
index ``(status, id, cpus, used_cpus, memory_mb, used_memory_mb)`` placement
reads the Up hosts through.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | None = None
depends_on: str | None = None

#: The states holding CPUs and memory (``HOLDS_DEVICES`` when this was written).
_HOLDING = "('Starting', 'Running', 'Stopping', 'Migrating')"
_INDEX = "ix_hosts_status_id_cpus_used_cpus_memory_mb_used_memory_mb"


def _sum(column: str) -> str:
    return (f"COALESCE((SELECT SUM(v.{column}) FROM vm_instances v WHERE v.host_id = hosts.id "
            f"AND v.state IN {_HOLDING}), 0)")


def upgrade() -> None:
    """Adds the columns, fills them from the VMs, and adds the index."""
    # Plain ADD COLUMN (no batch copy): SQLite adds a column with a default in place.
    op.add_column("hosts", sa.Column("used_cpus", sa.Integer(), nullable=False,
                                     server_default="0"))
    op.add_column("hosts", sa.Column("used_memory_mb", sa.BigInteger(), nullable=False,
                                     server_default="0"))
    # updated_at keeps its value: it says when the host last reported.
    op.execute(f"UPDATE hosts SET used_cpus = {_sum('cpus')}, "
               f"used_memory_mb = {_sum('memory_mb')}")
    op.create_index(_INDEX, "hosts",
                    ["status", "id", "cpus", "used_cpus", "memory_mb", "used_memory_mb"])


def downgrade() -> None:
    """Drops the index and the columns."""
    op.drop_index(_INDEX, table_name="hosts")
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("used_memory_mb")
        batch.drop_column("used_cpus")
