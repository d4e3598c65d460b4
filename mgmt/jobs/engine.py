"""The job engine: creates jobs, sends their commands, finds them by answer, finishes, expires.

Every job kind goes through these functions: ``new_job`` records the request
that created it, ``send`` writes a command to the outbox and remembers its
message id as the one the job waits for, ``job_for_answer`` finds the job an
answer correlates to by that id (an indexed column), ``finish`` ends a job
with one ``JobFinished`` event, and ``Expiry`` hands an overdue job to the
handler of its kind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from hostdev.messages.base import Message
from hostdev.messages.events import JobFinished
from hostdev.messages.values import JobState
from hostdev.mgmt import metrics
from hostdev.mgmt.jobs import payloads
from hostdev.mgmt.persistence.models import JOB_RUNNING, Job, VmInstance, utcnow
from hostdev.mgmt.persistence.unit_of_work import TxContext

log = structlog.get_logger()

#: Handles one overdue job of a kind (locked, still running, past its deadline).
ExpiryHandler = Callable[[TxContext, Job], bool]


def new_job(tx: TxContext, kind: payloads.JobKind, vm: VmInstance, step: str,
            payload: payloads.Payload, deadline: datetime | None) -> Job:
    """Adds a running job for ``vm``; the caller's flush inserts it.

    The id of the request being handled is kept, so a redelivered request
    finds the job it created (``job_of_request``).
    """
    job = Job(kind=kind, state=JOB_RUNNING, vm_id=vm.id, step=step, details="",
              deadline=deadline, request_id=tx.message_id)
    payloads.store(job, payload)
    tx.session.add(job)
    return job


def send(tx: TxContext, job: Job, routing_key: str, command: Message) -> str:
    """Writes ``command`` to the outbox; its answer will find ``job``. Returns its id."""
    command_id = tx.outbox.send(routing_key, command)
    job.command_id = command_id
    return command_id


def job_for_answer(tx: TxContext, vm_uuid: str, correlation_id: str | None
                   ) -> tuple[Job | None, VmInstance | None]:
    """Returns the running job (locked) waiting for the answer and the VM it names.

    An answer correlates to the command the job sent last; one for an earlier
    command, another VM or a finished job finds none.
    """
    vm = tx.session.scalar(select(VmInstance).where(VmInstance.uuid == vm_uuid))
    if vm is None:
        log.warning("answer_for_unknown_vm", vm=vm_uuid, correlation_id=correlation_id)
        return None, None
    job = None
    if correlation_id:
        job = tx.session.scalar(select(Job).where(
            Job.command_id == correlation_id, Job.vm_id == vm.id, Job.state == JOB_RUNNING)
            .with_for_update())
    if job is None:
        log.info("answer_without_job", vm=vm_uuid, correlation_id=correlation_id)
    return job, vm


def job_of_request(session: Session, request_id: str) -> Job | None:
    """Returns the job a (redelivered) API request created, if any."""
    return session.scalar(select(Job).where(Job.request_id == request_id)
                          .order_by(Job.id.desc()).limit(1))


def finish(tx: TxContext, job: Job, state: JobState, details: str, *, step: str = "done") -> None:
    """Ends a job: ``JobFinished`` to the outbox, its duration observed at commit."""
    if job.id is None:
        tx.session.flush()  # the routing key names the job
    job.state = state
    job.details = details
    job.step = step
    job.deadline = None
    job.finished_at = utcnow()
    vm = tx.session.get(VmInstance, job.vm_id) if job.vm_id is not None else None
    outcome = "Succeeded" if state == "succeeded" else "Failed"
    tx.outbox.add(f"job.{job.id}.{outcome}",
                  JobFinished(job_id=job.id, job_kind=job.kind, state=state,
                              vm_uuid=vm.uuid if vm is not None else None, step=step,
                              details=details, at=utcnow().isoformat() + "Z"))
    log.info("job_finished", job=job.id, kind=job.kind, state=state, step=step,
             details=details)
    tx.after_commit.append(metrics.job_duration(job))


def overdue(tx: TxContext, limit: int = 100) -> list[int]:
    """Returns the ids of running jobs past their deadline."""
    return list(tx.session.scalars(
        select(Job.id).where(Job.state == JOB_RUNNING, Job.deadline < utcnow())
        .order_by(Job.deadline).limit(limit)))


class Expiry:
    """Hands each overdue job to the handler of its kind."""

    def __init__(self, handlers: Mapping[str, ExpiryHandler]) -> None:
        self._handlers = dict(handlers)

    def expire(self, tx: TxContext, job_id: int) -> bool:
        """Expires one overdue job; False if it finished or moved on meanwhile."""
        job = tx.session.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None or job.state != "running" or job.deadline is None \
                or job.deadline >= utcnow():
            return False
        handler = self._handlers.get(job.kind)
        if handler is None:
            finish(tx, job, "failed", f"timed out: no handler for {job.kind} jobs",
                   step=job.step)
            return True
        return handler(tx, job)
