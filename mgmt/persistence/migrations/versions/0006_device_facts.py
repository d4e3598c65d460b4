"""Stores every fact an agent reports of a PCI device, and why an operator disabled it.

Adds, on ``op_host_pci_devices``: the vendor's and product's names, the PCI
class, the NUMA node, the IOMMU group's members (listed in ``pci.devices`` or
not), the physical function of a virtual function and the virtual functions
of a physical function (canonical addresses, comma-separated), the host
driver, and ``disabled_reason``. Existing rows get empty values (NUMA node
and physical function NULL) until their host's next start-up report fills
them in.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-11
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

# Room for a comma-separated list of 256 canonical addresses (13 characters with the comma).
_ADDRESS_LIST = 13 * 256


def upgrade() -> None:
    """Adds the columns."""
    with op.batch_alter_table("op_host_pci_devices") as batch:
        batch.add_column(sa.Column("vendor", sa.String(length=255), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("product", sa.String(length=255), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("class_code", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("numa_node", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("iommu_members", sa.String(length=_ADDRESS_LIST),
                                   nullable=False, server_default=""))
        batch.add_column(sa.Column("physical_function", sa.String(length=12), nullable=True))
        batch.add_column(sa.Column("virtual_functions", sa.String(length=_ADDRESS_LIST),
                                   nullable=False, server_default=""))
        batch.add_column(sa.Column("driver", sa.String(length=64), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("disabled_reason", sa.String(length=255), nullable=False,
                                   server_default=""))


def downgrade() -> None:
    """Drops the columns."""
    with op.batch_alter_table("op_host_pci_devices") as batch:
        for name in ("disabled_reason", "driver", "virtual_functions", "physical_function",
                     "iommu_members", "numa_node", "class_code", "product", "vendor"):
            batch.drop_column(name)
