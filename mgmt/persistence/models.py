"""Maps the management database (Alembic owns the schema; these models are its reference)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final, get_args

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from hostdev.messages.limits import MAX_DEVICES
from hostdev.messages.values import (
    DeviceState,
    HostStatus,
    JobState,
    MigrationPolicy,
    NumaPolicy,
    VmState,
)

# Constraints and indexes are named by this convention, so migrations name
# them the same on every database.
NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}

# The protocol's literal types are the one spelling of these values; the
# CHECK constraints below and the code read these tuples of them.
HOST_STATUSES: Final[tuple[HostStatus, ...]] = get_args(HostStatus)
DEVICE_STATES: Final[tuple[DeviceState, ...]] = get_args(DeviceState)
VM_STATES: Final[tuple[VmState, ...]] = get_args(VmState)
MIGRATION_POLICIES: Final[tuple[MigrationPolicy, ...]] = get_args(MigrationPolicy)
NUMA_POLICIES: Final[tuple[NumaPolicy, ...]] = get_args(NumaPolicy)
JOB_STATES: Final[tuple[JobState, ...]] = get_args(JobState)
# The values SQL conditions compare with, by name: the type checker sees the
# spelling of a typed attribute compared in Python, not inside an expression.
HOST_UP: Final[HostStatus] = "Up"
HOST_DISCONNECTED: Final[HostStatus] = "Disconnected"
HOST_DOWN: Final[HostStatus] = "Down"
HOST_PREPARING: Final[HostStatus] = "PrepareForMaintenance"
HOST_MAINTENANCE: Final[HostStatus] = "Maintenance"
#: The statuses only an operator changes (``hostdev host maintenance|activate``):
#: an agent's start-up or ping never turns them back to Up.
OPERATOR_STATUSES: Final[tuple[HostStatus, ...]] = (HOST_PREPARING, HOST_MAINTENANCE)
VM_STOPPED: Final[VmState] = "Stopped"
VM_RUNNING: Final[VmState] = "Running"
VM_DESTROYED: Final[VmState] = "Destroyed"
VM_ERROR: Final[VmState] = "Error"
JOB_PENDING: Final[JobState] = "pending"
JOB_RUNNING: Final[JobState] = "running"

# MariaDB's DATETIME drops fractions unless asked; job deadlines and outbox
# order want microseconds.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# TEXT holds 65535 bytes on MariaDB, fewer characters than a domain template may have.
LongText = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# InnoDB for row locks; binary collation so names compare exactly as on SQLite
# (``10GE`` and ``10ge`` are two names).
#: The length of a canonical PCI address (``0000:28:00.1``).
ADDRESS_LENGTH: Final = 12
#: Room for a comma-separated list of as many addresses as a host may report.
ADDRESS_LIST_LENGTH: Final = (ADDRESS_LENGTH + 1) * MAX_DEVICES
#: Room for why a host is in its status.
STATUS_REASON_LENGTH: Final = 1024
MYSQL_OPTIONS: Final = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}


def utcnow() -> datetime:
    """Returns the current time as naive UTC, the form every timestamp column stores."""
    return datetime.now(UTC).replace(tzinfo=None)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class Base(DeclarativeBase):
    """Declarative root sharing one naming convention for constraints and indexes."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Host(Base):
    """A hypervisor host, created when its agent first sends ``StartupRoutingCommand``."""

    __tablename__ = "hosts"
    __table_args__ = (
        CheckConstraint(_one_of("status", HOST_STATUSES), name="status"),
        # Placement's search: the Up hosts after a host id, in id order, with their
        # room read from the index alone (docs/database.md, "Placement's search").
        Index(None, "status", "id", "cpus", "used_cpus", "memory_mb", "used_memory_mb"),
        MYSQL_OPTIONS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    guid: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(255))
    status: Mapped[HostStatus] = mapped_column(String(32), default="Up")
    #: Why the host is in its status (what keeps it preparing for maintenance), "" if nothing.
    status_reason: Mapped[str] = mapped_column(String(STATUS_REASON_LENGTH), server_default="")
    #: Its agent resets every device a VM lets go of (``pci.reset.on.release``).
    reset_on_release: Mapped[bool] = mapped_column(Boolean, server_default=false())
    last_ping: Mapped[datetime | None] = mapped_column(Timestamp)
    cpus: Mapped[int] = mapped_column(Integer, default=0)
    memory_mb: Mapped[int] = mapped_column(BigInteger, default=0)
    #: The CPUs and memory of its VMs in a ``HOLDS_DEVICES`` state, kept in the
    #: transaction that moves one (``hostdev.mgmt.vms.capacity``).
    used_cpus: Mapped[int] = mapped_column(Integer, server_default="0")
    used_memory_mb: Mapped[int] = mapped_column(BigInteger, server_default="0")
    hypervisor_version: Mapped[str] = mapped_column(String(64), default="")
    #: The libvirt URI peers migrate to this host with (as its agent announces it).
    migration_uri: Mapped[str] = mapped_column(String(1024), default="", server_default="")
    #: How many domains its last complete report listed that management did not place there.
    foreign_domains: Mapped[int] = mapped_column(Integer, server_default="0")
    #: Those domains, ``name (uuid)`` separated by ``, `` (capped), for the operator.
    foreign_domain_names: Mapped[str | None] = mapped_column(Text)
    #: The boot id and sequence number of the host's last applied report
    #: (``hostdev.mgmt.hosts.report_order``); NULL until an agent that numbers them reports.
    report_boot_id: Mapped[str | None] = mapped_column(String(64))
    report_seq: Mapped[int | None] = mapped_column(BigInteger)
    #: The boot id the host's agent had before its last restart: its late reports are stale.
    retired_boot_id: Mapped[str | None] = mapped_column(String(64))
    #: Bumped first by every transaction that changes device states on a host with
    #: ``device_rules``: such transactions write one common row, so they serialize.
    device_epoch: Mapped[int] = mapped_column(BigInteger, server_default="0")
    #: True when hardware rules tie its devices together (an IOMMU group of several
    #: listed devices, a listed PF with a listed VF) or its agent withholds one.
    device_rules: Mapped[bool] = mapped_column(Boolean, server_default=false())
    #: What the host's last reconciled ping reported and held (``hostdev.mgmt.hosts.pings``):
    #: a ping that finds the same skips reconciling; NULL reconciles the next one.
    reconciled_digest: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)


class HostBlock(Base):
    """The room the Up hosts of 256 host ids may have: what placement's search may skip.

    Kept by ``hostdev.mgmt.placement.blocks`` (docs/database.md, "Placement's search").
    """

    __tablename__ = "host_blocks"
    __table_args__ = (MYSQL_OPTIONS,)

    #: ``hosts.id >> 8``.
    block: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    #: One bit per cell of (free CPUs, free memory) an Up host of the block is in, or was
    #: in since the block was last tightened.
    cells: Mapped[int] = mapped_column(BigInteger, server_default="0")
    #: Bumped by every write that sets bits, so that it always changes the row.
    raised: Mapped[int] = mapped_column(BigInteger, server_default="0")


class ServiceOffering(Base):
    """A compute offering: CPUs, memory, the PCI devices it asks for, a migration policy."""

    __tablename__ = "service_offerings"
    __table_args__ = (
        CheckConstraint(_one_of("migration_policy", MIGRATION_POLICIES), name="migration_policy"),
        CheckConstraint(_one_of("numa_policy", NUMA_POLICIES), name="numa_policy"),
        MYSQL_OPTIONS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    cpus: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(BigInteger)
    migration_policy: Mapped[MigrationPolicy] = mapped_column(String(16), default="forbid")
    numa_policy: Mapped[NumaPolicy] = mapped_column(String(16), default="none",
                                                    server_default="none")
    #: The domain template its VMs are built from; NULL: the minimal domain.
    template_name: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class ServiceOfferingPciRequest(Base):
    """N devices of one name that an offering asks for (``10GE,10GE`` is 10GE x 2)."""

    __tablename__ = "service_offering_pci_requests"
    __table_args__ = (
        UniqueConstraint("offering_id", "name"),
        CheckConstraint("count > 0", name="count_positive"),
        MYSQL_OPTIONS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    offering_id: Mapped[int] = mapped_column(ForeignKey("service_offerings.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    count: Mapped[int] = mapped_column(Integer, default=1)


class VmInstance(Base):
    """A VM; transitions are conditional UPDATEs on ``(state, update_count)``."""

    __tablename__ = "vm_instances"
    __table_args__ = (
        CheckConstraint(_one_of("state", VM_STATES), name="state"),
        Index(None, "offering_id"),
        Index(None, "host_id", "state"),
        Index(None, "last_host_id"),
        MYSQL_OPTIONS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    name: Mapped[str] = mapped_column(String(255))
    offering_id: Mapped[int] = mapped_column(ForeignKey("service_offerings.id"))
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id"))
    last_host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id"))
    state: Mapped[VmState] = mapped_column(String(16), default=VM_STOPPED)
    update_count: Mapped[int] = mapped_column(BigInteger, default=0)
    cpus: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(BigInteger)
    #: The boot id and sequence number of the last answer accepted for the VM:
    #: a report of that boot numbered below it does not change the VM.
    answer_boot_id: Mapped[str | None] = mapped_column(String(64))
    answer_seq: Mapped[int | None] = mapped_column(BigInteger)
    #: The NUMA node its devices were placed on; NULL when its offering has no NUMA policy.
    numa_node: Mapped[int | None] = mapped_column(Integer)
    #: The version of its offering's template it was built from; NULL without a template.
    template_version: Mapped[int | None] = mapped_column(Integer)
    #: The file its serial console is written to on its host; NULL when it has none.
    console_path: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)


class DomainTemplate(Base):
    """One version of a named libvirt domain template (``hostdev template create``)."""

    __tablename__ = "domain_templates"
    __table_args__ = (UniqueConstraint("name", "version"), MYSQL_OPTIONS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    xml: Mapped[str] = mapped_column(LongText)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class PciDevice(Base):
    """A passthrough device on a host; ``instance_id`` is NULL unless a VM holds it.

    States, and the invariants ``hostdev.mgmt.devices.pci_devices`` keeps:

    - ``free``: ``instance_id`` and ``reserved_for`` are NULL.
    - ``allocated``: ``instance_id`` is the VM that holds the device.
    - ``reserved``: ``reserved_for`` is the VM migrating to this host.
    - ``quarantined``: gone from the agent's inventory while held or reserved;
      ``instance_id`` or ``reserved_for`` still names the VM; never offered.
    - ``disabled``: taken out of service by an operator while free.
    - ``unavailable``: free, but a hardware rule keeps it from offer (its IOMMU
      group, its PF or VFs, what its agent withholds); ``reason`` says which.
    - ``cleaning``: let go by its VM, waiting for its host to reset it.
    - ``removed``: gone from the inventory and held by nobody; kept (never
      deleted) so a device that comes back keeps its id and history.

    Indexes: ``(host_id, name, state)`` serves claims (free devices of one
    name on one host) and per-host counts; ``(state, name, host_id)`` serves
    placement's grouped free counts over all hosts; ``instance_id`` and
    ``reserved_for`` serve releases.
    """

    __tablename__ = "op_host_pci_devices"
    __table_args__ = (
        UniqueConstraint("host_id", "domain", "bus", "slot", "function"),
        CheckConstraint(_one_of("state", DEVICE_STATES), name="state"),
        Index(None, "host_id", "name", "state"),
        Index(None, "state", "name", "host_id"),
        Index(None, "instance_id"),
        Index(None, "reserved_for"),
        MYSQL_OPTIONS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id"))
    name: Mapped[str] = mapped_column(String(64))
    # Lowercase hexadecimal, as in the canonical address 0000:28:00.1.
    domain: Mapped[str] = mapped_column(String(4))
    bus: Mapped[str] = mapped_column(String(2))
    slot: Mapped[str] = mapped_column(String(2))
    function: Mapped[str] = mapped_column(String(1))
    instance_id: Mapped[int | None] = mapped_column(ForeignKey("vm_instances.id"))
    reserved_for: Mapped[int | None] = mapped_column(ForeignKey("vm_instances.id"))
    vendor_id: Mapped[str] = mapped_column(String(8), default="")
    product_id: Mapped[str] = mapped_column(String(8), default="")
    iommu_group: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[DeviceState] = mapped_column(String(16), default="free")
    vendor: Mapped[str] = mapped_column(String(255), default="", server_default="")
    product: Mapped[str] = mapped_column(String(255), default="", server_default="")
    class_code: Mapped[int] = mapped_column(Integer, server_default="0")
    numa_node: Mapped[int | None] = mapped_column(Integer)
    # Canonical addresses, comma-separated; every member of the IOMMU group,
    # listed in pci.devices or not, so a group's foreign members stay known.
    iommu_members: Mapped[str] = mapped_column(String(ADDRESS_LIST_LENGTH), default="",
                                               server_default="")
    physical_function: Mapped[str | None] = mapped_column(String(ADDRESS_LENGTH))
    virtual_functions: Mapped[str] = mapped_column(String(ADDRESS_LIST_LENGTH), default="",
                                                   server_default="")
    driver: Mapped[str] = mapped_column(String(64), default="", server_default="")
    #: Why the device is in its state (who disabled it, which rule keeps it unavailable).
    reason: Mapped[str] = mapped_column(String(255), default="", server_default="")
    #: Why its agent withholds it from offer, "" when it does not.
    withheld: Mapped[str] = mapped_column(String(255), default="", server_default="")
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)


class Job(Base):
    """A long operation (deploy, start, stop, migrate) and its progress."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_one_of("state", JOB_STATES), name="state"),
        Index(None, "state", "deadline"),
        Index(None, "vm_id"),
        Index(None, "command_id"),
        Index(None, "request_id"),
        MYSQL_OPTIONS,
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[JobState] = mapped_column(String(16), default=JOB_PENDING)
    vm_id: Mapped[int | None] = mapped_column(ForeignKey("vm_instances.id"))
    step: Mapped[str] = mapped_column(String(64), default="")
    details: Mapped[str] = mapped_column(Text, default="")
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    deadline: Mapped[datetime | None] = mapped_column(Timestamp)
    payload: Mapped[str] = mapped_column(Text, default="{}")
    #: The message id of the command whose answer the job waits for.
    command_id: Mapped[str | None] = mapped_column(String(64))
    #: The guid of the host that command went to: the only host that may answer it.
    command_host: Mapped[str | None] = mapped_column(String(64))
    #: The message id of the API request that created the job.
    request_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)


class HandledMessage(Base):
    """The ``message_id`` of a bus message whose handler committed (idempotency)."""

    __tablename__ = "handled_messages"
    __table_args__ = (Index(None, "handled_at"), MYSQL_OPTIONS)

    message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    handled_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class OutboxEvent(Base):
    """An event written in the transaction that caused it, published after commit."""

    __tablename__ = "event_outbox"
    __table_args__ = (Index(None, "published_at", "id"), Index(None, "message_id", unique=True),
                      MYSQL_OPTIONS)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    #: The AMQP message id, random (unguessable) and kept so a republication repeats it.
    message_id: Mapped[str | None] = mapped_column(String(32))
    routing_key: Mapped[str] = mapped_column(String(255))
    type: Mapped[str] = mapped_column(String(64))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(Timestamp)
