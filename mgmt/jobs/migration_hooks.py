"""Wires ``MigrationManager`` into the management service's handlers and sweeper.

Each function returns the ``(session, message, incoming)`` callable the
service runs in one unit of work: host reports first go to the registry as
before, then settle any migration the reporting host takes part in; the
answers of ``MigrateCommand`` and ``AttachPciDevicesCommand`` advance their
jobs; overdue migrate and attach-devices jobs are expired here, the others by
``JobManager``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hostdev.messages.bus.contract import Incoming
from hostdev.messages.commands import (
    AttachPciDevicesAnswer,
    MigrateAnswer,
    PingRoutingCommand,
    StartupAnswer,
    StartupRoutingCommand,
    VmStateReport,
)
from hostdev.messages.values import DomainInfo
from hostdev.mgmt.jobs.migration_plan import ATTACH_JOB, MIGRATE_JOB
from hostdev.mgmt.persistence.models import Job, utcnow

if TYPE_CHECKING:
    from hostdev.mgmt.service import ManagementService

Handler = Callable[[Session, Any, Incoming], Any]


def on_startup(service: ManagementService) -> Handler:
    """Registers the host, then settles migrations from its full domain list."""
    def handle(session: Session, message: StartupRoutingCommand,
               incoming: Incoming) -> StartupAnswer:
        answer = service.registry.on_startup(session, message)
        service.migrations.on_host_report(session, message.guid, message.domains,
                                          complete=True, restarted=True)
        return answer
    return handle


def on_ping(service: ManagementService) -> Handler:
    """Keeps the host Up, then settles migrations from its full domain list."""
    def handle(session: Session, message: PingRoutingCommand, incoming: Incoming) -> None:
        service.registry.on_ping(session, message)
        service.migrations.on_host_report(session, message.guid, message.domains,
                                          complete=True)
    return handle


def on_vm_state_report(service: ManagementService) -> Handler:
    """Follows a lifecycle report, then settles a migration the domain is part of."""
    def handle(session: Session, message: VmStateReport, incoming: Incoming) -> None:
        service.registry.on_vm_state_report(session, message)
        domain = DomainInfo(uuid=message.vm_uuid, name=message.vm_name or message.vm_uuid,
                            state=message.state, hostdevs=message.hostdevs)
        service.migrations.on_host_report(session, message.guid, (domain,), complete=False)
    return handle


def on_migrate_answer(service: ManagementService) -> Handler:
    """Advances the migration the answer correlates to."""
    def handle(session: Session, message: MigrateAnswer, incoming: Incoming) -> None:
        service.migrations.on_migrate_answer(session, message, incoming.correlation_id)
    return handle


def on_attach_answer(service: ManagementService) -> Handler:
    """Ends the attach (or re-attach) step the answer correlates to."""
    def handle(session: Session, message: AttachPciDevicesAnswer, incoming: Incoming) -> None:
        service.migrations.on_attach_answer(session, message, incoming.correlation_id)
    return handle


def expire(service: ManagementService, session: Session, job_id: int) -> bool:
    """Expires one overdue job: migration jobs here, the others through ``JobManager``."""
    kind = session.scalar(select(Job.kind).where(Job.id == job_id))
    if kind not in (MIGRATE_JOB, ATTACH_JOB):
        return service.jobs.expire(session, job_id)
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
    if job is None or job.state != "running" or job.deadline is None \
            or job.deadline >= utcnow():
        return False
    return service.migrations.expire(session, job)
