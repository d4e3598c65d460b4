"""Prepares the hardware rules: two device states, a state reason, NUMA policy and node.

On ``op_host_pci_devices``: the states ``unavailable`` (free, but a hardware
rule keeps the device from offer) and ``cleaning`` (released, waiting for its
host's reset) join the CHECK constraint; ``disabled_reason`` becomes
``reason`` (why the device is in its state, whatever the state); ``withheld``
keeps why its agent withholds it from offer. On ``service_offerings``:
``numa_policy`` (``none`` for every existing offering, as before). On
``vm_instances``: ``numa_node``, the node its devices were placed on (NULL for
existing VMs).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

_OLD_STATES = ("free", "allocated", "reserved", "quarantined", "disabled", "removed")
_NEW_STATES = (*_OLD_STATES, "unavailable", "cleaning")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _copy_from(name: str) -> sa.Table | None:
    """Returns the table as 0006 left it, for SQLite's offline SQL (nothing to reflect)."""
    if not (context.is_offline_mode() and op.get_context().dialect.name == "sqlite"):
        return None  # online, batch mode reflects the table
    meta = sa.MetaData()
    created = (sa.Column("created_at", sa.DateTime(), nullable=False),)
    if name == "service_offerings":
        return sa.Table(
            name, meta, sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("name", sa.String(255), nullable=False, unique=True),
            sa.Column("cpus", sa.Integer(), nullable=False),
            sa.Column("memory_mb", sa.BigInteger(), nullable=False),
            sa.Column("migration_policy", sa.String(16), nullable=False), *created,
            sa.CheckConstraint(_one_of("migration_policy", ("forbid", "detach-attach")),
                               name="ck_service_offerings_migration_policy"))
    text = {"server_default": "", "nullable": False}
    return sa.Table(
        name, meta, sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("host_id", sa.Integer(), sa.ForeignKey("hosts.id"), nullable=False),
        *(sa.Column(column, sa.String(length), nullable=False) for column, length in
          (("name", 64), ("domain", 4), ("bus", 2), ("slot", 2), ("function", 1))),
        *(sa.Column(column, sa.Integer(), sa.ForeignKey("vm_instances.id"))
          for column in ("instance_id", "reserved_for")),
        sa.Column("vendor_id", sa.String(8), nullable=False),
        sa.Column("product_id", sa.String(8), nullable=False),
        sa.Column("iommu_group", sa.Integer()),
        sa.Column("state", sa.String(16), nullable=False), *created,
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("vendor", sa.String(255), **text), sa.Column("product", sa.String(255), **text),
        sa.Column("class_code", sa.Integer(), server_default="0", nullable=False),
        sa.Column("numa_node", sa.Integer()),
        sa.Column("iommu_members", sa.String(13 * 256), **text),
        sa.Column("physical_function", sa.String(12)),
        sa.Column("virtual_functions", sa.String(13 * 256), **text),
        sa.Column("driver", sa.String(64), **text),
        sa.Column("disabled_reason", sa.String(255), **text),
        sa.CheckConstraint(_one_of("state", _OLD_STATES), name="ck_op_host_pci_devices_state"),
        sa.UniqueConstraint("host_id", "domain", "bus", "slot", "function"))


def upgrade() -> None:
    """Widens the device states, renames the reason and adds the columns."""
    with op.batch_alter_table("op_host_pci_devices",
                              copy_from=_copy_from("op_host_pci_devices")) as batch:
        batch.drop_constraint(op.f("ck_op_host_pci_devices_state"), type_="check")
        batch.create_check_constraint(op.f("ck_op_host_pci_devices_state"),
                                      _one_of("state", _NEW_STATES))
        batch.alter_column("disabled_reason", new_column_name="reason",
                           existing_type=sa.String(length=255), existing_nullable=False,
                           existing_server_default="")
        batch.add_column(sa.Column("withheld", sa.String(length=255), nullable=False,
                                   server_default=""))
    with op.batch_alter_table("service_offerings",
                              copy_from=_copy_from("service_offerings")) as batch:
        batch.add_column(sa.Column("numa_policy", sa.String(length=16), nullable=False,
                                   server_default="none"))
        batch.create_check_constraint(op.f("ck_service_offerings_numa_policy"),
                                      _one_of("numa_policy", ("required", "preferred", "none")))
    with op.batch_alter_table("vm_instances") as batch:
        batch.add_column(sa.Column("numa_node", sa.Integer(), nullable=True))


def downgrade() -> None:
    """Narrows the states back (devices in a new state become free) and drops the columns."""
    op.execute("UPDATE op_host_pci_devices SET state = 'free' "
               "WHERE state IN ('unavailable', 'cleaning')")
    with op.batch_alter_table("vm_instances") as batch:
        batch.drop_column("numa_node")
    with op.batch_alter_table("service_offerings") as batch:
        batch.drop_constraint(op.f("ck_service_offerings_numa_policy"), type_="check")
        batch.drop_column("numa_policy")
    with op.batch_alter_table("op_host_pci_devices") as batch:
        batch.drop_column("withheld")
        batch.alter_column("reason", new_column_name="disabled_reason",
                           existing_type=sa.String(length=255), existing_nullable=False,
                           existing_server_default="")
        batch.drop_constraint(op.f("ck_op_host_pci_devices_state"), type_="check")
        batch.create_check_constraint(op.f("ck_op_host_pci_devices_state"),
                                      _one_of("state", _OLD_STATES))
