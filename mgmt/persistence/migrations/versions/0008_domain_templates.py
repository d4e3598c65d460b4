"""Stores domain templates, the template an offering names and what a VM was built from.

Adds ``domain_templates`` (one row per version of a named libvirt domain
template), ``service_offerings.template_name`` (NULL: the minimal domain),
and on ``vm_instances`` the template version the VM was built from and the
file its console is written to (both NULL without a template).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None

MYSQL_OPTIONS = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}


def _timestamp() -> sa.types.TypeEngine[object]:
    fsp6 = mysql.DATETIME(fsp=6)
    return sa.DateTime().with_variant(fsp6, "mariadb").with_variant(fsp6, "mysql")


def _long_text() -> sa.types.TypeEngine[object]:
    # TEXT holds 65535 bytes on MariaDB, fewer characters than a template may have.
    medium = mysql.MEDIUMTEXT()
    return sa.Text().with_variant(medium, "mariadb").with_variant(medium, "mysql")


def upgrade() -> None:
    """Creates the table and adds the columns."""
    op.create_table(
        "domain_templates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("xml", _long_text(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_domain_templates")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_domain_templates_name_version")),
        **MYSQL_OPTIONS,
    )
    with op.batch_alter_table("service_offerings") as batch:
        batch.add_column(sa.Column("template_name", sa.String(length=64), nullable=True))
    with op.batch_alter_table("vm_instances") as batch:
        batch.add_column(sa.Column("template_version", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("console_path", sa.String(length=1024), nullable=True))


def downgrade() -> None:
    """Drops the columns and the table."""
    with op.batch_alter_table("vm_instances") as batch:
        batch.drop_column("console_path")
        batch.drop_column("template_version")
    with op.batch_alter_table("service_offerings") as batch:
        batch.drop_column("template_name")
    op.drop_table("domain_templates")
