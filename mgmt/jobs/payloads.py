"""Typed, versioned payloads of each job kind, stored as JSON in ``jobs.payload``.

``load`` and ``store`` are the one place a payload is decoded and encoded.
The command a job waits for and the request that created it are columns of
``jobs`` (``command_id``, ``request_id``), not payload fields, so answers and
redelivered requests find their job by index.
"""

from __future__ import annotations

from typing import Final, Literal, NamedTuple, TypeVar

import msgspec
from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from hostdev.mgmt.persistence.database import PreparedStatement
from hostdev.mgmt.persistence.models import JOB_RUNNING, Job

#: The payload layout written today; a decoder for an older one goes here when it changes.
VERSION: Final = 1

JobKind = Literal["deploy", "start", "stop", "destroy", "migrate", "attach-devices",
                  "maintenance"]

DEPLOY_JOB: Final = "deploy"
START_JOB: Final = "start"
STOP_JOB: Final = "stop"
DESTROY_JOB: Final = "destroy"
MIGRATE_JOB: Final = "migrate"
ATTACH_JOB: Final = "attach-devices"
MAINTENANCE_JOB: Final = "maintenance"


class StartPayload(msgspec.Struct, kw_only=True):
    """A deploy or start: where it was tried and where it runs now.

    Attributes:
        avoid: host guids the request excluded.
        tried: host guids a StartCommand went to, in order.
        failures: ``"<guid>: <reason>"`` of each failed start.
        host: the guid of the host of the current attempt.
        host_name: its name.
    """

    version: int = VERSION
    avoid: list[str] = msgspec.field(default_factory=list)
    tried: list[str] = msgspec.field(default_factory=list)
    failures: list[str] = msgspec.field(default_factory=list)
    host: str = ""
    host_name: str = ""


class StopPayload(msgspec.Struct, kw_only=True):
    """A stop or destroy: the host the StopCommand went to."""

    version: int = VERSION
    host: str = ""


class AttachPayload(msgspec.Struct, kw_only=True):
    """An attach-devices job, or the attach step of a migration.

    Attributes:
        attach_host: the guid of the host the AttachPciDevicesCommand went to.
        attach: the addresses it asked to attach.
    """

    version: int = VERSION
    attach_host: str = ""
    attach: list[str] = msgspec.field(default_factory=list)


class MigratePayload(AttachPayload, kw_only=True):
    """A live migration: both hosts, the device mapping and what went wrong.

    Attributes:
        mapping: ``[name, source address, destination address]`` per device.
        absent_on: the sides (``source``, ``destination``) that listed their
            domains without the VM while the outcome was unknown.
        failure: why the migration was rolled back, when it was.
        failed_step: the step it failed at.
    """

    source: str
    source_id: int
    source_name: str
    destination: str
    destination_id: int
    destination_name: str
    mapping: list[list[str]] = msgspec.field(default_factory=list)
    absent_on: list[str] = msgspec.field(default_factory=list)
    failure: str = ""
    #: The NUMA node of the reserved set (None: spread, no policy, or no node).
    numa_node: int | None = None
    failed_step: str = ""


class MaintenancePayload(msgspec.Struct, kw_only=True):
    """A host's maintenance: the jobs it began to empty the host.

    Attributes:
        host_id: the host being emptied.
        migrations: the migrate jobs moving its VMs off.
        stops: the stop jobs of VMs whose offering forbids migration (``--stop``).
    """

    version: int = VERSION
    host_id: int
    migrations: list[int] = msgspec.field(default_factory=list)
    stops: list[int] = msgspec.field(default_factory=list)


Payload = StartPayload | StopPayload | AttachPayload | MigratePayload | MaintenancePayload
P = TypeVar("P", StartPayload, StopPayload, AttachPayload, MigratePayload, MaintenancePayload)

#: The payload type of each job kind.
PAYLOAD_OF: Final[dict[str, type[Payload]]] = {
    DEPLOY_JOB: StartPayload, START_JOB: StartPayload,
    STOP_JOB: StopPayload, DESTROY_JOB: StopPayload,
    MIGRATE_JOB: MigratePayload, ATTACH_JOB: AttachPayload,
    MAINTENANCE_JOB: MaintenancePayload,
}


def load(job: Job, kind: type[P]) -> P:
    """Decodes a job's payload as ``kind`` (fields a payload does not know are ignored).

    Raises:
        TypeError: ``kind`` is not the payload type of the job's kind.
    """
    if PAYLOAD_OF.get(job.kind) is not kind:
        raise TypeError(f"job {job.id} is a {job.kind} job, its payload is not a "
                        f"{kind.__name__}")
    return msgspec.json.decode(job.payload or "{}", type=kind)


def store(job: Job, payload: Payload) -> None:
    """Encodes ``payload`` into the job's row."""
    job.payload = msgspec.json.encode(payload).decode()


class _Sides(msgspec.Struct):
    """The two hosts of a migration payload: all a host's report needs to read of it."""

    source: str = ""
    destination: str = ""


class RunningMigration(NamedTuple):
    """A running migrate job that a host takes part in, read without locks."""

    job_id: int
    vm_id: int | None
    step: str


#: The payloads of the running migrations (hosts are in them, not in columns).
_RUNNING_MIGRATIONS = PreparedStatement(select(Job.payload).where(
    Job.kind == MIGRATE_JOB, Job.state == JOB_RUNNING))


def migrating_hosts(connection: Connection) -> set[str]:
    """Returns the guids of the hosts that running migrations move a VM from or to.

    One read per batch of pings, without locks: a report of one of them is
    handled alone (``hostdev.mgmt.hosts.pings``), through ``migrations_of``.
    """
    hosts: set[str] = set()
    for (raw,) in _RUNNING_MIGRATIONS.execute(connection, {}).rows:
        sides = msgspec.json.decode(raw or "{}", type=_Sides)
        hosts.update((sides.source, sides.destination))
    return hosts


def migrations_of(session: Session, guid: str) -> list[RunningMigration]:
    """Returns the running migrations from or to host ``guid`` (every host report asks).

    Only the columns and the two hosts of each payload are read, without
    locks: a caller that changes a job locks it and looks at it again.
    """
    rows = session.execute(select(Job.id, Job.vm_id, Job.step, Job.payload).where(
        Job.kind == MIGRATE_JOB, Job.state == JOB_RUNNING))
    found = []
    for job_id, vm_id, step, raw in rows:
        sides = msgspec.json.decode(raw or "{}", type=_Sides)
        if guid in (sides.source, sides.destination):
            found.append(RunningMigration(job_id, vm_id, step))
    return found
