"""Remembers what each host's last reconciled ping reported, so an unchanged one is not reconciled.

Adds ``hosts.reconciled_digest``: the digest of the host's domain report
(``PingRoutingCommand.domains_digest``) together with the VMs management had
placed on it when that ping was last reconciled. NULL after the upgrade: the
first ping of each host is reconciled and sets it.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Adds ``hosts.reconciled_digest``."""
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("reconciled_digest", sa.String(length=64), nullable=True))


def downgrade() -> None:
    """Drops ``hosts.reconciled_digest``."""
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("reconciled_digest")
