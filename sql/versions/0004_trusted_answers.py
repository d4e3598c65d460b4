"""Ties answers to the host a command went to, with ids nobody can guess; counts foreign domains.

Adds ``event_outbox.message_id`` (a random id given to each row when it is
written, so a republication after a crash carries the same id; indexed, as
an answer is checked against the host its command went to),
``jobs.command_host`` (the guid of the host the awaited command went to: only
that host may answer it) and, on ``hosts``, ``foreign_domains`` and
``foreign_domain_names`` (the domains the host's last complete report listed
that management did not place there). Rows written before the upgrade keep
their old ids (``outbox-<id>``, derived when published); an answer to a
command sent before the upgrade is refused (nothing says which host may
send it) and its job times out like one whose command was lost.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Adds the columns."""
    with op.batch_alter_table("event_outbox") as batch:
        batch.add_column(sa.Column("message_id", sa.String(length=32), nullable=True))
        batch.create_index("ix_event_outbox_message_id", ["message_id"], unique=True)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("command_host", sa.String(length=64), nullable=True))
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("foreign_domains", sa.Integer(), server_default="0",
                                   nullable=False))
        batch.add_column(sa.Column("foreign_domain_names", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drops the columns."""
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("foreign_domain_names")
        batch.drop_column("foreign_domains")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("command_host")
    with op.batch_alter_table("event_outbox") as batch:
        batch.drop_index("ix_event_outbox_message_id")
        batch.drop_column("message_id")
