"""Finds a job by the command it waits for and by the request that created it, by index.

Adds ``jobs.command_id`` and ``jobs.request_id`` (indexed) and carries the
ids over from the JSON payloads that held them until now: ``request``, and
``command_id`` (or ``attach_id`` once an attach step was sent).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

#: Steps after which a job waits for an AttachPciDevicesAnswer, not its first command.
_ATTACH_STEPS = ("attach", "reattach")

_JOBS = sa.table("jobs", sa.column("id", sa.BigInteger), sa.column("kind", sa.String),
                 sa.column("step", sa.String), sa.column("payload", sa.Text),
                 sa.column("command_id", sa.String), sa.column("request_id", sa.String))


def _awaited(kind: str, step: str, payload: dict[str, object]) -> object:
    """Returns the id of the command a job waits for, as its old payload says."""
    if kind == "attach-devices" or step in _ATTACH_STEPS:
        return payload.get("attach_id")
    return payload.get("command_id")


def upgrade() -> None:
    """Adds the columns and their indexes, then fills them from the payloads."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("command_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("request_id", sa.String(length=64), nullable=True))
        batch.create_index("ix_jobs_command_id", ["command_id"])
        batch.create_index("ix_jobs_request_id", ["request_id"])
    if op.get_context().as_sql:
        return  # offline SQL (the schema script): there are no rows to carry over
    connection = op.get_bind()
    rows = connection.execute(sa.select(_JOBS.c.id, _JOBS.c.kind, _JOBS.c.step,
                                        _JOBS.c.payload)).all()
    for job_id, kind, step, raw in rows:
        payload = json.loads(raw or "{}")
        command_id = _awaited(kind, step, payload)
        request_id = payload.get("request")
        if command_id is None and request_id is None:
            continue
        connection.execute(sa.update(_JOBS).where(_JOBS.c.id == job_id)
                           .values(command_id=command_id, request_id=request_id))


def downgrade() -> None:
    """Puts the ids back into the payloads, then drops the columns."""
    rows = [] if op.get_context().as_sql else op.get_bind().execute(
        sa.select(_JOBS.c.id, _JOBS.c.kind, _JOBS.c.step, _JOBS.c.payload,
                  _JOBS.c.command_id, _JOBS.c.request_id)).all()
    for job_id, kind, step, raw, command_id, request_id in rows:
        payload = json.loads(raw or "{}")
        if command_id is not None:
            key = "attach_id" if kind == "attach-devices" or step in _ATTACH_STEPS \
                else "command_id"
            payload[key] = command_id
        if request_id is not None:
            payload["request"] = request_id
        op.execute(sa.update(_JOBS).where(_JOBS.c.id == job_id)
                   .values(payload=json.dumps(payload)))
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_request_id")
        batch.drop_index("ix_jobs_command_id")
        batch.drop_column("request_id")
        batch.drop_column("command_id")
