"""Ties answers to the host a command went to, with ids nobody can guess; counts foreign domains.

Adds ``event_outbox.message_id`` (a random id given to each row when it is
written, so a republication after a crash carries the same id; indexed, as
an answer is checked against the host its command went to),
``jobs.command_host`` (the guid of the host the awaited command went to: only
that host may answer it) and, on ``hosts``, ``foreign_domains`` and
``foreign_domain_names`` (the domains the host's last complete report listed
that management did not place there). Commands written before the upgrade
keep the id they were (or will be) published with, ``outbox-<id>``, now
stored; a running job's ``command_host`` is the host its command's routing
key names. So an agent's answer to a command sent before the upgrade is
still accepted from that host, and only from it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

_OUTBOX = sa.table("event_outbox", sa.column("id", sa.BigInteger),
                   sa.column("routing_key", sa.String), sa.column("message_id", sa.String))
_JOBS = sa.table("jobs", sa.column("id", sa.BigInteger), sa.column("state", sa.String),
                 sa.column("command_id", sa.String), sa.column("command_host", sa.String))
#: The id an outbox row was published with before ids were stored.
_LEGACY_PREFIX = "outbox-"

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Adds the columns, then stores the ids of earlier commands and the hosts jobs await."""
    with op.batch_alter_table("event_outbox") as batch:
        batch.add_column(sa.Column("message_id", sa.String(length=32), nullable=True))
        batch.create_index("ix_event_outbox_message_id", ["message_id"], unique=True)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("command_host", sa.String(length=64), nullable=True))
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("foreign_domains", sa.Integer(), server_default="0",
                                   nullable=False))
        batch.add_column(sa.Column("foreign_domain_names", sa.Text(), nullable=True))
    if op.get_context().as_sql:
        return  # offline SQL (the schema script): there are no rows to carry over
    connection = op.get_bind()
    commands = dict(connection.execute(
        sa.select(_OUTBOX.c.id, _OUTBOX.c.routing_key)
        .where(_OUTBOX.c.routing_key.like("agent.%"))).all())
    for row_id in commands:
        connection.execute(sa.update(_OUTBOX).where(_OUTBOX.c.id == row_id)
                           .values(message_id=f"{_LEGACY_PREFIX}{row_id}"))
    waiting = connection.execute(sa.select(_JOBS.c.id, _JOBS.c.command_id).where(
        _JOBS.c.state == "running", _JOBS.c.command_id.like(f"{_LEGACY_PREFIX}%"))).all()
    for job_id, command_id in waiting:
        number = command_id.removeprefix(_LEGACY_PREFIX)
        key = commands.get(int(number)) if number.isdigit() else None
        if key is not None:  # agent.<guid>.<Type>
            connection.execute(sa.update(_JOBS).where(_JOBS.c.id == job_id)
                               .values(command_host=key.split(".")[1]))


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
