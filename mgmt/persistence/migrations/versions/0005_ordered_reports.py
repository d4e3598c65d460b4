"""Orders reports by the agent's boot id and sequence number instead of by time.

Adds, on ``hosts``, ``report_boot_id`` and ``report_seq`` (the last report
applied for the host) and ``retired_boot_id`` (the boot before the agent's
last restart, whose late reports are stale), and, on ``vm_instances``,
``answer_boot_id`` and ``answer_seq`` (the last answer accepted for the VM).
All are NULL after the upgrade: the first numbered report of each host is
applied and starts its sequence; reports of agents that number nothing keep
the time-based grace.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Adds the columns."""
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("report_boot_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("report_seq", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("retired_boot_id", sa.String(length=64), nullable=True))
    with op.batch_alter_table("vm_instances") as batch:
        batch.add_column(sa.Column("answer_boot_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("answer_seq", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    """Drops the columns."""
    with op.batch_alter_table("vm_instances") as batch:
        batch.drop_column("answer_seq")
        batch.drop_column("answer_boot_id")
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("retired_boot_id")
        batch.drop_column("report_seq")
        batch.drop_column("report_boot_id")
