"""Wires the management daemon: bus consumers, handlers, sweepers, outbox.

``ManagementService`` is a plain class with an explicit lifecycle: the
constructor does no I/O; ``start()`` connects the bus, declares the queues,
registers the consumers and timers; ``run()`` drives the bus loop (on the
calling thread) until ``stop()``. Tests, the demo and ``hostdev-mgmt run`` use
it the same way, with a real or an in-process bus and any engine.

Any number of services may run against one database and one broker: they
compete on ``hostdev.mgmt`` and ``hostdev.api``; every change is conditional
and every job is in the database, so any of them can advance any job.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any

import structlog
from sqlalchemy import Engine, delete, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.bus.contract import API_QUEUE, MGMT_QUEUE, BusLike, Incoming
from hostdev.messages.commands import (
    AttachPciDevicesAnswer,
    ErrorAnswer,
    MigrateAnswer,
    PingRoutingCommand,
    StartAnswer,
    StartupRoutingCommand,
    StopAnswer,
    VmStateReport,
)
from hostdev.messages.errors import TransientError
from hostdev.messages.runtime.logging import bound_message
from hostdev.mgmt.api.api_handlers import ApiHandlers
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.errors import MgmtError
from hostdev.mgmt.hosts.registration import HostRegistry, check_sender, guid_of
from hostdev.mgmt.jobs import migration_hooks
from hostdev.mgmt.jobs.jobs import JobManager, job_of_request
from hostdev.mgmt.jobs.migration import MigrationManager
from hostdev.mgmt.persistence.database import TransactionConflict
from hostdev.mgmt.persistence.models import HandledMessage, VmInstance, utcnow
from hostdev.mgmt.persistence.outbox import OutboxPublisher
from hostdev.mgmt.persistence.unit_of_work import AlreadyHandled, UnitOfWork
from hostdev.mgmt.vms.vm_lifecycle import PciDeviceManager, VmLifecycleManager

log = structlog.get_logger()

#: API requests that change something (recorded in handled_messages).
_CHANGES = (api.CreateOfferingRequest, api.DeployVmRequest, api.StartVmRequest,
            api.StopVmRequest, api.DestroyVmRequest, api.SetPciDeviceEnabledRequest,
            api.MigrateVmRequest, api.AttachVmDevicesRequest)


class ManagementService:
    """The management daemon as an object: start, run, stop."""

    def __init__(self, config: MgmtConfig, bus: BusLike, engine: Engine, *,
                 name: str | None = None) -> None:
        self.config = config
        self.bus = bus
        self.engine = engine
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.outbox = OutboxPublisher(engine, bus)
        self.work = UnitOfWork(engine, self.outbox)
        self.devices = PciDeviceManager()
        self.lifecycle = VmLifecycleManager([self.devices])
        self.jobs = JobManager(config, self.lifecycle, self.devices)
        self.registry = HostRegistry(config, self.lifecycle)
        self.migrations = MigrationManager(config, self.lifecycle)
        self.api = ApiHandlers(config, self.work, self.jobs, self.migrations)
        self._started = False

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Connects the bus, declares queues, registers consumers and periodic sweeps."""
        self.bus.connect()
        self.bus.declare_mgmt_queues()
        self.bus.consume(MGMT_QUEUE, self.agent_handlers())
        self.bus.consume(API_QUEUE, self.api_handlers())
        self.bus.call_every(self.config.host_sweep_interval_s, self._guard(self.sweep_hosts))
        self.bus.call_every(self.config.job_sweep_interval_s, self._guard(self.expire_jobs))
        self.bus.call_every(0.2, self._guard(self.outbox.mark_published))
        self.bus.call_every(2.0, self._guard(self.outbox.publish_stale))
        self.bus.call_every(3600.0, self._guard(self.purge))
        self._started = True
        log.info("mgmt_started", service=self.name, bus=self.bus.config.safe_url(),
                 db=self.engine.url.render_as_string())

    def run(self, *, until: Callable[[], bool] | None = None,
            timeout: float | None = None) -> None:
        """Starts if needed and drives the bus loop on this thread until ``stop()``."""
        if not self._started:
            self.start()
        self.bus.run(until=until, timeout=timeout)

    def stop(self) -> None:
        """Asks the loop to return after the message in hand (thread-safe)."""
        self.bus.stop()

    def close(self) -> None:
        """Marks what was published, then closes the bus connection."""
        try:
            self.outbox.mark_published()
        except Exception as exc:  # the stale sweep of any daemon republishes them
            log.warning("outbox_mark_failed", error=str(exc))
        self.bus.close()

    # -- periodic work ---------------------------------------------------------------

    def sweep_hosts(self) -> None:
        """Marks silent hosts Disconnected or Down."""
        self.work.run(self.registry.sweep, what="sweep hosts")

    def expire_jobs(self) -> None:
        """Fails and rolls back the jobs past their deadline."""
        overdue = self.work.run(self.jobs.overdue, what="find overdue jobs")
        for job_id in overdue:
            self.work.run(partial(migration_hooks.expire, self, job_id=job_id),
                          what=f"expire job {job_id}")

    def purge(self, older_than_s: float = 86400.0) -> None:
        """Deletes handled message ids and published outbox rows older than a day."""
        self.outbox.purge(older_than_s)
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        self.work.run(lambda session: session.execute(
            delete(HandledMessage).where(HandledMessage.handled_at < cutoff)),
            what="purge handled messages")

    def _guard(self, fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except Exception as exc:  # a timer must not kill the loop; next tick retries
                log.error("periodic_task_failed", task=getattr(fn, "__name__", "?"),
                          error=str(exc))
        return run

    # -- handlers --------------------------------------------------------------------

    def agent_handlers(self) -> dict[type[Message], Callable[[Any, Incoming], Message | None]]:
        """Returns the handlers of ``hostdev.mgmt`` (messages from agents)."""
        return {
            StartupRoutingCommand: self._from_agent(migration_hooks.on_startup(self)),
            PingRoutingCommand: self._from_agent(migration_hooks.on_ping(self)),
            VmStateReport: self._from_agent(migration_hooks.on_vm_state_report(self)),
            StartAnswer: self._from_agent(self._start_answer, record=True),
            StopAnswer: self._from_agent(self._stop_answer, record=True),
            MigrateAnswer: self._from_agent(migration_hooks.on_migrate_answer(self),
                                            record=True),
            AttachPciDevicesAnswer: self._from_agent(migration_hooks.on_attach_answer(self),
                                                     record=True),
            ErrorAnswer: self._agent_error,
        }

    def _from_agent(self, fn: Callable[[Any, Any, Incoming], Message | None], *,
                    record: bool = False) -> Callable[[Any, Incoming], Message | None]:
        def handler(message: Any, incoming: Incoming) -> Message | None:
            guid = getattr(message, "guid", None) or guid_of(incoming.routing_key) or ""
            vm = getattr(message, "vm_uuid", None)
            with bound_message(incoming.message_id, incoming.correlation_id, host=guid, vm=vm):
                check_sender(incoming.user_id, guid, incoming.routing_key)
                try:
                    return self.work.run(lambda session: fn(session, message, incoming),
                                         what=type(message).__name__,
                                         message_id=incoming.message_id if record else None)
                except AlreadyHandled as exc:
                    log.info("message_already_handled", reason=exc.reason)
                    return None
                except (TransactionConflict, OperationalError, IntegrityError) as exc:
                    # A race with another daemon (two start-ups of a new host) or a
                    # database hiccup: the redelivery finds the winner's rows.
                    raise TransientError(f"{type(message).__name__}: {exc}") from exc
        return handler

    def _start_answer(self, session: Session, answer: StartAnswer,
                      incoming: Incoming) -> None:
        self.jobs.on_start_answer(session, answer, incoming.correlation_id)

    def _stop_answer(self, session: Session, answer: StopAnswer, incoming: Incoming) -> None:
        self.jobs.on_stop_answer(session, answer, incoming.correlation_id)

    def _agent_error(self, message: ErrorAnswer, incoming: Incoming) -> None:
        log.error("agent_refused_message", host=guid_of(incoming.routing_key),
                  correlation_id=incoming.correlation_id, code=message.code,
                  details=message.details)
        return None

    def _already_handled(self, message_id: str, exc: AlreadyHandled) -> Message:
        """Answers a redelivered request: the job it created, or a duplicate error."""
        def work(session: Session) -> Message:
            job = job_of_request(session, message_id)
            if job is None:
                return ErrorAnswer(code=exc.code, details=exc.reason)
            vm_uuid = session.scalar(select(VmInstance.uuid).where(VmInstance.id == job.vm_id))
            return api.JobAccepted(job_id=job.id, vm_uuid=vm_uuid,
                                   details="a redelivery of a request already accepted")
        log.info("api_request_redelivered", message_id=message_id)
        return self.work.run(work, what="find the job of a redelivered request")

    def api_handlers(self) -> dict[type[Message], Callable[[Any, Incoming], Message | None]]:
        """Returns the handlers of ``hostdev.api`` (requests from clients)."""
        return {kind: self._api(kind, fn) for kind, fn in self.api.handlers().items()}

    def _api(self, kind: type[Message], fn: Callable[..., Message]
             ) -> Callable[[Any, Incoming], Message | None]:
        changes = issubclass(kind, _CHANGES)

        def handler(message: Any, incoming: Incoming) -> Message | None:
            with bound_message(incoming.message_id, incoming.correlation_id,
                               request=kind.__name__):
                try:
                    if changes:
                        return fn(message, message_id=incoming.message_id)
                    return fn(message)
                except AlreadyHandled as exc:
                    return self._already_handled(incoming.message_id, exc)
                except MgmtError as exc:
                    log.info("api_request_refused", code=exc.code, reason=exc.reason)
                    return ErrorAnswer(code=exc.code, details=exc.reason)
                except OperationalError as exc:
                    raise TransientError(f"{kind.__name__}: the database failed: "
                                         f"{exc.orig}") from exc
        return handler
