"""Adds ``host_blocks``: which room the Up hosts of each 256 host ids may have.

Placement's host search reads only the blocks whose bits say a host there
may have the room a VM asks for (``hostdev.mgmt.placement.blocks``). The
upgrade gives every block that has hosts every bit (a bound that is too
high costs reads, never hides a host); the first tightening of a running
management daemon sets them from the hosts, within a minute.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | None = None
depends_on: str | None = None

MYSQL_OPTIONS = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}
#: Every cell's bit (7 CPU steps times 8 memory steps when this was written).
_ALL_CELLS = (1 << 56) - 1


def upgrade() -> None:
    """Creates the table and fills it with a bound too high for every block with hosts."""
    op.create_table(
        "host_blocks",
        sa.Column("block", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("cells", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("raised", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("block", name=op.f("pk_host_blocks")),
        **MYSQL_OPTIONS,
    )
    op.execute(f"INSERT INTO host_blocks (block, cells, raised) "
               f"SELECT DISTINCT id >> 8, {_ALL_CELLS}, 0 FROM hosts")


def downgrade() -> None:
    """Drops the table."""
    op.drop_table("host_blocks")
