"""Serializes the hardware rules per host: ``hosts.device_epoch`` and ``hosts.device_rules``.

``device_rules`` is true when a host's devices are related (two listed
devices in one IOMMU group, a listed PF with a listed VF) or one is withheld
by its agent; ``device_epoch`` is the counter every transaction that changes
device states on such a host bumps first, so two of them always write one
common row (InnoDB row lock, Galera certification) and run one after the other.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Adds ``hosts.device_epoch`` (0) and ``hosts.device_rules`` (false until a start-up)."""
    # Plain ADD COLUMN (no batch copy): SQLite adds a column with a default in place.
    op.add_column("hosts", sa.Column("device_epoch", sa.BigInteger(), nullable=False,
                                     server_default="0"))
    op.add_column("hosts", sa.Column("device_rules", sa.Boolean(), nullable=False,
                                     server_default=sa.false()))


def downgrade() -> None:
    """Drops both columns."""
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("device_rules")
        batch.drop_column("device_epoch")
