"""Keeps the libvirt URI each host announces for incoming live migrations.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Adds ``hosts.migration_uri`` (``StartupRoutingCommand.migration_uri``)."""
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("migration_uri", sa.String(length=1024), nullable=False,
                                   server_default=""))


def downgrade() -> None:
    """Drops ``hosts.migration_uri``."""
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("migration_uri")
