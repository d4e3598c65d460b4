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
import re
import socket
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any

import structlog
from sqlalchemy import Engine, delete, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.bus.contract import API_QUEUE, MGMT_QUEUE, Batching, BusLike, Incoming
from hostdev.messages.commands import (
    AttachPciDevicesAnswer,
    ErrorAnswer,
    MigrateAnswer,
    PingRoutingCommand,
    ResetPciDevicesAnswer,
    StartAnswer,
    StartupAnswer,
    StartupRoutingCommand,
    StopAnswer,
    VmStateReport,
)
from hostdev.messages.errors import TransientError
from hostdev.messages.limits import clip
from hostdev.messages.values import DomainInfo
from hostdev.mgmt.api.api_handlers import ApiHandlers
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.devices import cleaning
from hostdev.mgmt.errors import InvalidRequest, MgmtError
from hostdev.mgmt.hosts.pings import PING_LINGER_S, PingManager
from hostdev.mgmt.hosts.registration import HostRegistry, check_sender, guid_of
from hostdev.mgmt.hosts.startups import STARTUP_LINGER_S, StartupBatch
from hostdev.mgmt.jobs import engine
from hostdev.mgmt.jobs.engine import Expiry, job_of_request
from hostdev.mgmt.jobs.jobs import JobManager, find_host
from hostdev.mgmt.jobs.maintenance import MaintenanceManager
from hostdev.mgmt.jobs.migration import MigrationManager
from hostdev.mgmt.jobs.migration_recovery import MigrationRecovery
from hostdev.mgmt.jobs.payloads import (
    ATTACH_JOB,
    DEPLOY_JOB,
    DESTROY_JOB,
    MIGRATE_JOB,
    START_JOB,
    STOP_JOB,
)
from hostdev.mgmt.persistence.database import TransactionConflict
from hostdev.mgmt.persistence.models import HandledMessage, VmInstance, utcnow
from hostdev.mgmt.persistence.outbox import OutboxPublisher
from hostdev.mgmt.persistence.unit_of_work import AlreadyHandled, TxContext, UnitOfWork
from hostdev.mgmt.pipeline import Handler, Pipeline, Route, always, no_check
from hostdev.mgmt.placement import blocks
from hostdev.mgmt.vms.vm_lifecycle import PciDeviceManager, VmLifecycleManager

log = structlog.get_logger()

#: The agents' messages handled together, each by its own route, in one transaction.
JOINT_KINDS: tuple[type[Message], ...] = (StartAnswer, StopAnswer, VmStateReport)
#: No waiting: a run is what the bus holds already (a lone answer is handled at once).
ANSWER_LINGER_S = 0.0
#: The API requests handled together, each by its own route, in one transaction:
#: those that create or move one VM and answer at once with its job. Each
#: runs as alone, in order, so a later one sees what an earlier one claimed.
#: Queries are left out (a refused one, say an unknown job, would cost the
#: run its transaction), and so are requests whose work is not small.
API_JOINT_KINDS: tuple[type[Message], ...] = (
    api.DeployVmRequest, api.StartVmRequest, api.StopVmRequest, api.DestroyVmRequest)


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
        self.recovery = MigrationRecovery(self.migrations)
        self.pings = PingManager(self.registry, self.recovery)
        self.startups = StartupBatch(config)
        self.maintenance = MaintenanceManager(self.jobs, self.migrations)
        self.api = ApiHandlers(config, self.jobs, self.migrations, self.maintenance)
        self.expiry = Expiry({
            DEPLOY_JOB: self.jobs.expire, START_JOB: self.jobs.expire,
            STOP_JOB: self.jobs.expire, DESTROY_JOB: self.jobs.expire,
            MIGRATE_JOB: self.recovery.expire, ATTACH_JOB: self.recovery.expire,
        })
        #: Messages from agents: the sender must be the host it speaks for.
        self.agent_pipeline = Pipeline(self.work, _agent_log_context, _check_agent,
                                       _agent_error_answer)
        #: Requests from clients: refusals become ErrorAnswers.
        self.api_pipeline = Pipeline(self.work, _api_log_context, no_check,
                                     self._api_error_answer)
        self.blocks = blocks.Tightening(self.work)
        self._started = False

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Connects the bus, declares queues, registers consumers and periodic sweeps."""
        self.bus.connect()
        self.bus.declare_mgmt_queues()
        self.bus.consume(MGMT_QUEUE, self.agent_handlers(), self.agent_batches())
        self.bus.consume(API_QUEUE, self.api_handlers(), self.api_batches())
        self.bus.call_every(self.config.host_sweep_interval_s, self._guard(self.sweep_hosts))
        self.bus.call_every(self.config.job_sweep_interval_s, self._guard(self.expire_jobs))
        self.bus.call_every(0.2, self._guard(self.outbox.mark_published))
        self.bus.call_every(2.0, self._guard(self.outbox.publish_stale))
        self.bus.call_every(3600.0, self._guard(self.purge))
        self.bus.call_every(blocks.TIGHTEN_INTERVAL_S, self._guard(self.blocks.tighten_next))
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
        """Marks what the broker confirmed (waiting briefly), then closes the bus connection."""
        try:
            self.outbox.mark_all_published()
        except Exception as exc:  # the stale sweep of any daemon republishes them
            log.warning("outbox_mark_failed", error=str(exc))
        self.bus.close()

    # -- periodic work ---------------------------------------------------------------

    def sweep_hosts(self) -> None:
        """Marks silent hosts Disconnected or Down; puts emptied ones in Maintenance."""
        self.work.run(self.registry.sweep, what="sweep hosts")
        self.work.run(self.maintenance.sweep, what="advance host maintenance")

    def expire_jobs(self) -> None:
        """Fails and rolls back the jobs past their deadline."""
        overdue = self.work.run(engine.overdue, what="find overdue jobs")
        for job_id in overdue:
            self.work.run(partial(self.expiry.expire, job_id=job_id),
                          what=f"expire job {job_id}")

    def purge(self, older_than_s: float = 86400.0) -> None:
        """Deletes handled message ids and published outbox rows older than a day."""
        self.outbox.purge(older_than_s)
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        self.work.run(lambda tx: tx.session.execute(
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

    def agent_handlers(self) -> dict[type[Message], Handler]:
        """Returns the handlers of ``hostdev.mgmt`` (messages from agents)."""
        handlers = self.agent_pipeline.handlers(self._agent_routes())
        handlers[ErrorAnswer] = self._agent_error
        return handlers

    def _agent_routes(self) -> dict[type[Message], Route]:
        return {
            StartupRoutingCommand: Route(self._on_startup),
            PingRoutingCommand: Route(self.pings.on_ping),
            VmStateReport: Route(self._on_vm_state_report),
            StartAnswer: Route(self._on_start_answer, always),
            StopAnswer: Route(self._on_stop_answer, always),
            MigrateAnswer: Route(self._on_migrate_answer, always),
            AttachPciDevicesAnswer: Route(self._on_attach_answer, always),
            ResetPciDevicesAnswer: Route(self._on_reset_answer, always),
        }

    def agent_batches(self) -> dict[type[Message], Batching]:
        """Returns the message types of ``hostdev.mgmt`` handled in batches.

        Pings and start-ups by their batch work; start and stop answers and
        lifecycle reports, in any mix, each by its own route in one shared
        transaction (``Pipeline.joint_handler``).
        """
        routes = self._agent_routes()
        joint = {kind: routes[kind] for kind in JOINT_KINDS}
        pings = self.agent_pipeline.batch_handler(
            PingRoutingCommand, Route(self.pings.on_ping), self.pings.on_pings)
        startups = self.agent_pipeline.batch_handler(
            StartupRoutingCommand, Route(self._on_startup), self.startups.on_startups)
        # A run is at most what the broker lets through unacked.
        prefetch = self.bus.config.prefetch
        # One Batching for all of them: a run is not cut where the type changes.
        answers = Batching(self.agent_pipeline.joint_handler(joint, what="agent answers"),
                           max_size=prefetch, linger_s=ANSWER_LINGER_S)
        return {PingRoutingCommand: Batching(pings, max_size=prefetch, linger_s=PING_LINGER_S),
                StartupRoutingCommand: Batching(startups, max_size=prefetch,
                                                linger_s=STARTUP_LINGER_S),
                **{kind: answers for kind in JOINT_KINDS}}

    def api_handlers(self) -> dict[type[Message], Handler]:
        """Returns the handlers of ``hostdev.api`` (requests from clients)."""
        return self.api_pipeline.handlers(self.api.routes())

    def api_batches(self) -> dict[type[Message], Batching]:
        """Returns the request types of ``hostdev.api`` handled together (deploys and the like).

        Each request of a run runs its own route, in order, in ONE transaction
        (``Pipeline.joint_handler``): one COMMIT for all the deploys the bus
        holds. Each is answered (its job, or its refusal) after the commit;
        if any fails (a taken name, no capacity, a lost race) the run rolls
        back and each request is handled alone, so what a request gets never
        depends on its run.
        """
        routes = self.api.routes()
        joint = self.api_pipeline.joint_handler(
            {kind: routes[kind] for kind in API_JOINT_KINDS}, what="API requests")
        together = Batching(joint, max_size=self.bus.config.prefetch, linger_s=ANSWER_LINGER_S)
        return {kind: together for kind in API_JOINT_KINDS}

    def _on_startup(self, tx: TxContext, message: StartupRoutingCommand,
                    incoming: Incoming) -> StartupAnswer:
        """Registers the host, then settles migrations from its full domain list."""
        registration = self.registry.on_startup(tx, message)
        self.pings.on_startup(tx, message, registration.answer.host_id, registration.applied,
                              registration.placed)
        if registration.applied:  # a stale report settles nothing
            self.recovery.on_host_report(tx, message.guid, message.domains, complete=True,
                                         restarted=True)
        return registration.answer

    def _on_vm_state_report(self, tx: TxContext, message: VmStateReport,
                            incoming: Incoming) -> None:
        """Follows a lifecycle report, then settles a migration the domain is part of."""
        if self.registry.on_vm_state_report(tx, message) != "Migrating":
            return  # stale, or no migration of the VM to settle (the report leaves
            # a Migrating VM as it is)
        domain = DomainInfo(uuid=message.vm_uuid, name=message.vm_name or message.vm_uuid,
                            state=message.state, hostdevs=message.hostdevs)
        self.recovery.on_host_report(tx, message.guid, (domain,), complete=False)

    def _on_start_answer(self, tx: TxContext, answer: StartAnswer, incoming: Incoming) -> None:
        self.jobs.on_start_answer(tx, answer, incoming.correlation_id,
                                  guid_of(incoming.routing_key))

    def _on_stop_answer(self, tx: TxContext, answer: StopAnswer, incoming: Incoming) -> None:
        self.jobs.on_stop_answer(tx, answer, incoming.correlation_id,
                                 guid_of(incoming.routing_key))

    def _on_migrate_answer(self, tx: TxContext, answer: MigrateAnswer,
                           incoming: Incoming) -> None:
        self.migrations.on_migrate_answer(tx, answer, incoming.correlation_id,
                                          guid_of(incoming.routing_key))

    def _on_attach_answer(self, tx: TxContext, answer: AttachPciDevicesAnswer,
                          incoming: Incoming) -> None:
        self.migrations.on_attach_answer(tx, answer, incoming.correlation_id,
                                         guid_of(incoming.routing_key))

    def _on_reset_answer(self, tx: TxContext, answer: ResetPciDevicesAnswer,
                         incoming: Incoming) -> None:
        cleaning.on_reset_answer(tx, answer, incoming.correlation_id,
                                 guid_of(incoming.routing_key))

    def _agent_error(self, message: ErrorAnswer, incoming: Incoming) -> None:
        log.error("agent_refused_message", host=guid_of(incoming.routing_key),
                  correlation_id=incoming.correlation_id, code=message.code,
                  details=message.details)
        return None

    def _api_error_answer(self, message: Any, incoming: Incoming,
                          exc: Exception) -> Message | None:
        """Answers a refused request, a redelivered one, or asks for a redelivery."""
        if isinstance(exc, AlreadyHandled) and incoming.message_id is not None:
            return self._already_handled(message, incoming.message_id, exc)
        if isinstance(exc, MgmtError):
            log.info("api_request_refused", code=exc.code, reason=exc.reason)
            return ErrorAnswer(code=exc.code, details=clip(exc.reason))
        if isinstance(exc, OperationalError):
            raise TransientError(_database_failed(message, exc)) from exc
        if isinstance(exc, DBAPIError):  # a value the request carries does not fit a row
            code = "conflict" if isinstance(exc, IntegrityError) else "invalid"
            return ErrorAnswer(code=code, details=_database_refused(message, exc))
        raise exc

    def _already_handled(self, message: Any, message_id: str, exc: AlreadyHandled) -> Message:
        """Answers a redelivered request: the job it created, or a duplicate error.

        A maintenance request is answered in its own type (the host as it is
        now and the job that follows it), as its client expects.
        """
        def work(tx: TxContext) -> Message:
            job = job_of_request(tx.session, message_id)
            if job is None:
                return ErrorAnswer(code=exc.code, details=exc.reason)
            if isinstance(message, api.HostMaintenanceRequest):
                host = find_host(tx.session, message.host)
                return api.MaintenancePlan(host_guid=host.guid, host_name=host.name,
                                           status=host.status, job_id=job.id)
            vm_uuid = tx.session.scalar(select(VmInstance.uuid)
                                        .where(VmInstance.id == job.vm_id))
            return api.JobAccepted(job_id=job.id, vm_uuid=vm_uuid,
                                   details="a redelivery of a request already accepted")
        log.info("api_request_redelivered", message_id=message_id)
        return self.work.run(work, what="find the job of a redelivered request")


def _agent_log_context(message: Any, incoming: Incoming) -> dict[str, Any]:
    return {"host": _speaks_for(message, incoming), "vm": getattr(message, "vm_uuid", None)}


def _speaks_for(message: Any, incoming: Incoming) -> str:
    """Returns the host an agent's message speaks for: its ``guid``, else its routing key's."""
    return getattr(message, "guid", None) or guid_of(incoming.routing_key) or ""


def _check_agent(message: Any, incoming: Incoming) -> None:
    check_sender(incoming.user_id, _speaks_for(message, incoming), incoming.routing_key)


def _agent_error_answer(message: Any, incoming: Incoming, exc: Exception) -> Message | None:
    """Drops a redelivery; asks for a redelivery after a race or a database hiccup."""
    if isinstance(exc, AlreadyHandled):
        log.info("message_already_handled", reason=exc.reason)
        return None
    if isinstance(exc, TransactionConflict):
        raise TransientError(f"{type(message).__name__}: {exc}") from exc
    if isinstance(exc, (OperationalError, IntegrityError)):
        # A race with another daemon (two start-ups of a new host) or a
        # database hiccup: the redelivery finds the winner's rows.
        raise TransientError(_database_failed(message, exc)) from exc
    if isinstance(exc, DBAPIError):
        raise InvalidRequest(_database_refused(message, exc)) from exc
    raise exc


#: Where MariaDB and SQLite name the column or key a refused value was for.
_COLUMN = re.compile(r"(?:for column|for key|failed:) '?(?P<name>[\w.]+)")


def _database_refused(message: Any, exc: DBAPIError) -> str:
    """Says which message the database refused and for which column; logs the SQL error.

    The SQL text and the driver's message stay in the log: they show the
    schema and the values of other rows, and mean nothing to an operator.
    """
    name = type(message).__name__
    found = _COLUMN.search(str(exc.orig))
    where = f" (column or key {found['name']})" if found else ""
    log.error("database_refused", message_type=name, error=str(exc.orig),
              statement=exc.statement)
    return (f"the database refused {name}: a value does not fit or conflicts with a stored "
            f"row{where}; nothing was changed")


def _database_failed(message: Any, exc: DBAPIError) -> str:
    """Says that the database failed a message (retried); logs the SQL error."""
    name = type(message).__name__
    log.warning("database_failed", message_type=name, error=str(exc.orig),
                statement=exc.statement)
    return f"{name}: the database failed ({type(exc.orig).__name__}); retrying"


def _api_log_context(message: Any, incoming: Incoming) -> dict[str, Any]:
    return {"request": type(message).__name__}
