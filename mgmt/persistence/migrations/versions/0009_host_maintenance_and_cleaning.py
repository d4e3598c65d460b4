"""Host maintenance and device cleaning: a preparing status, its reason, reset on release.

On ``hosts``: the status ``PrepareForMaintenance`` (VMs are being moved off;
placement refuses the host, as it does ``Maintenance``) joins the CHECK
constraint and the column widens to hold it; ``status_reason`` says what
keeps a host preparing (a failed migration, a VM whose offering forbids
migration); ``reset_on_release`` records that the host's agent resets every
device a VM lets go of (``pci.reset.on.release``), so management keeps such a
device ``cleaning`` until the reset is reported.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import mysql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None

_OLD_STATUSES = ("Up", "Disconnected", "Down", "Maintenance")
_NEW_STATUSES = ("Up", "Disconnected", "Down", "PrepareForMaintenance", "Maintenance")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _copy_from() -> sa.Table | None:
    """Returns ``hosts`` as 0007 left it, for SQLite's offline SQL (nothing to reflect)."""
    if not (context.is_offline_mode() and op.get_context().dialect.name == "sqlite"):
        return None  # online, batch mode reflects the table
    stamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mariadb", "mysql")
    return sa.Table(
        "hosts", sa.MetaData(), sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("guid", sa.String(64), nullable=False, unique=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("last_ping", stamp), sa.Column("cpus", sa.Integer(), nullable=False),
        sa.Column("memory_mb", sa.BigInteger(), nullable=False),
        sa.Column("hypervisor_version", sa.String(64), nullable=False),
        sa.Column("created_at", stamp, nullable=False),
        sa.Column("updated_at", stamp, nullable=False),
        sa.Column("migration_uri", sa.String(1024), server_default="", nullable=False),
        sa.Column("foreign_domains", sa.Integer(), server_default="0", nullable=False),
        sa.Column("foreign_domain_names", sa.Text()),
        sa.Column("report_boot_id", sa.String(64)), sa.Column("report_seq", sa.BigInteger()),
        sa.Column("retired_boot_id", sa.String(64)),
        sa.CheckConstraint(_one_of("status", _OLD_STATUSES), name="ck_hosts_status"))


def upgrade() -> None:
    """Widens the host statuses and adds the reason and the reset flag."""
    with op.batch_alter_table("hosts", copy_from=_copy_from()) as batch:
        batch.drop_constraint(op.f("ck_hosts_status"), type_="check")
        batch.alter_column("status", type_=sa.String(length=32),
                           existing_type=sa.String(length=16), existing_nullable=False)
        batch.create_check_constraint(op.f("ck_hosts_status"), _one_of("status", _NEW_STATUSES))
        batch.add_column(sa.Column("status_reason", sa.String(length=1024), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("reset_on_release", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    """Narrows the statuses back (a preparing host becomes Maintenance) and drops the columns."""
    op.execute("UPDATE hosts SET status = 'Maintenance' WHERE status = 'PrepareForMaintenance'")
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("reset_on_release")
        batch.drop_column("status_reason")
        batch.drop_constraint(op.f("ck_hosts_status"), type_="check")
        batch.alter_column("status", type_=sa.String(length=16),
                           existing_type=sa.String(length=32), existing_nullable=False)
        batch.create_check_constraint(op.f("ck_hosts_status"), _one_of("status", _OLD_STATUSES))
