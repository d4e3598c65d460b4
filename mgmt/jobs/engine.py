"""The job engine: creates jobs, sends their commands, finds them by answer, finishes, expires.

Every job kind goes through these functions: ``new_job`` records the request
that created it, ``send`` writes a command to the outbox and remembers its
(random) message id and the host it goes to as what the job waits for,
``job_for_answer`` finds the job an answer correlates to by that id (an
indexed column), refuses an answer from any other host and records where the
accepted answer stands in its agent's sequence on the VM (reports the agent
took before it do not change the VM: ``hostdev.mgmt.hosts.report_order``),
``finish`` ends a job
with one ``JobFinished`` event, and ``Expiry`` hands an overdue job to the
handler of its kind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import structlog
from sqlalchemy import bindparam, inspect, select
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

from hostdev.messages.base import Message
from hostdev.messages.commands import (
    AttachPciDevicesAnswer,
    DetachPciDevicesAnswer,
    MigrateAnswer,
    StartAnswer,
    StopAnswer,
)
from hostdev.messages.events import JobFinished
from hostdev.messages.values import JobState
from hostdev.mgmt import metrics
from hostdev.mgmt.errors import ForgedAnswer
from hostdev.mgmt.jobs import payloads
from hostdev.mgmt.persistence.models import (
    JOB_RUNNING,
    Host,
    Job,
    OutboxEvent,
    VmInstance,
    utcnow,
)
from hostdev.mgmt.persistence.unit_of_work import TxContext

log = structlog.get_logger()
T = TypeVar("T")

#: Handles one overdue job of a kind (locked, still running, past its deadline).
ExpiryHandler = Callable[[TxContext, Job], bool]
#: The answers that advance a job: each names its VM and its place in the agent's sequence.
VmAnswer = (StartAnswer | StopAnswer | MigrateAnswer | AttachPciDevicesAnswer
            | DetachPciDevicesAnswer)


def new_job(tx: TxContext, kind: payloads.JobKind, vm: VmInstance | None, step: str,
            payload: payloads.Payload, deadline: datetime | None) -> Job:
    """Adds a running job for ``vm`` (None: a job of no VM); the caller's flush inserts it."""
    job = unsaved_job(tx, kind, vm, step, payload, deadline)
    tx.session.add(job)
    return job


def unsaved_job(tx: TxContext, kind: payloads.JobKind, vm: VmInstance | None, step: str,
                payload: payloads.Payload, deadline: datetime | None) -> Job:
    """Returns a running job for ``vm``, in no session: the caller inserts it
    (``insert_object``) once it is complete, or adds it to the session.

    The id of the request being handled is kept, so a redelivered request
    finds the job it created (``job_of_request``).
    """
    job = Job(kind=kind, state=JOB_RUNNING, vm_id=vm.id if vm is not None else None,
              step=step, details="",
              deadline=deadline, request_id=tx.message_id)
    payloads.store(job, payload)
    return job


def send(tx: TxContext, job: Job, guid: str, command: Message) -> str:
    """Writes ``command`` for host ``guid`` to the outbox; its answer will find ``job``.

    Only host ``guid`` may answer it (``job_for_answer``). Returns the command's id.
    """
    command_id = tx.outbox.send(f"agent.{guid}.{type(command).__name__}", command)
    job.command_id = command_id
    job.command_host = guid
    return command_id


def job_for_answer(tx: TxContext, answer: VmAnswer, correlation_id: str | None,
                   sender: str | None) -> tuple[Job | None, VmInstance | None]:
    """Returns the running job (locked) waiting for the answer and the VM it names.

    An answer must correlate to a command management sent (its exact,
    random id, as the outbox recorded it) and come from the host that command
    went to. It advances the job whose last command that is; a late or
    repeated answer (the job moved on) finds no job and changes nothing. An
    accepted answer's boot id and number are recorded on the VM.

    Args:
        tx: the transaction of the answer's handler.
        answer: the answer (it names the VM).
        correlation_id: the id of the command it answers.
        sender: the guid of the host it comes from (its routing key's, which
            the broker ties to the agent's user).

    Raises:
        ForgedAnswer: management sent no command with that id, the command
            went to another host, or its job concerns another VM; the answer
            changes nothing and is dead-lettered with this reason.
    """
    vm_uuid = answer.vm_uuid
    claimed = f"{_sender_text(sender)} for VM {vm_uuid}"
    if not correlation_id:
        raise ForgedAnswer(f"an answer from {claimed} carries no correlation_id, so it answers "
                           "no command; nothing changed")
    # The job waiting for this command knows its host: no outbox read on the
    # usual path. Only an answer no job waits for (late, or forged) is looked
    # up among the commands management sent.
    # One round trip (one for a whole run of answers): the job (locked), its
    # VM (locked: the answer writes it anyway) and the guid of the VM's host
    # (a subquery: not locked).
    job, vm, guid = _job_of_command(tx, correlation_id)
    if job is not None and job.command_host is not None:
        target: str | None = job.command_host
        if vm is not None and vm.host_id is not None and guid:
            tx.host_guids[vm.host_id] = guid
    else:
        job = vm = None
        target = _command_host(tx.session.scalar(
            select(OutboxEvent.routing_key).where(OutboxEvent.message_id == correlation_id)))
    if target is None:
        raise ForgedAnswer(
            f"an answer from {claimed} correlates to {correlation_id}, which is no command "
            "management sent (a guessed id, or one purged long ago); nothing changed")
    if target != sender:
        raise ForgedAnswer(
            f"an answer from {claimed} correlates to command {correlation_id}, which went to "
            f"host {target}: only that host may answer it; nothing changed")
    if job is not None and (vm is None or vm.uuid != vm_uuid):
        raise ForgedAnswer(
            f"an answer from {claimed} correlates to command {correlation_id} of job {job.id}, "
            f"which concerns VM {vm.uuid if vm is not None else '(none)'}; nothing changed")
    if job is None or job.state != JOB_RUNNING:
        # The job moved on (a later command, a deadline): a late or repeated answer.
        log.info("answer_without_job", vm=vm_uuid, correlation_id=correlation_id)
        return None, None
    assert vm is not None  # a job found above names this VM
    if answer.boot_id:
        # Written with the transition the answer causes (or alone before the
        # commit), outside the conditions on (state, update_count).
        tx.vm_values.setdefault(vm.id, {}).update(answer_boot_id=answer.boot_id,
                                                  answer_seq=answer.seq)
        set_committed_value(vm, "answer_boot_id", answer.boot_id)
        set_committed_value(vm, "answer_seq", answer.seq)
    return job, vm


_JOB_COLUMNS = [(attr.key, attr.columns[0]) for attr in inspect(Job).column_attrs]
_VM_COLUMNS = [(attr.key, attr.columns[0]) for attr in inspect(VmInstance).column_attrs]
#: The jobs awaiting some commands, their VMs (job and VM locked) and the guid of each
#: VM's host: plain rows, job columns then VM columns then the guid.
_JOBS_OF_COMMANDS = (
    select(*(column for _, column in _JOB_COLUMNS), *(column for _, column in _VM_COLUMNS),
           select(Host.guid).where(Host.id == VmInstance.host_id).scalar_subquery())
    .outerjoin(VmInstance, VmInstance.id == Job.vm_id)
    .where(Job.command_id.in_(bindparam("command_ids", expanding=True)))
    .with_for_update())
_COMMAND_ID = [key for key, _ in _JOB_COLUMNS].index("command_id")
_VM_ID = [key for key, _ in _VM_COLUMNS].index("id")
#: ``run_cache`` key: command id -> its row of ``_JOBS_OF_COMMANDS`` (None: no job).
_READ_AHEAD = "jobs_of_commands"


def _job_of_command(tx: TxContext, command_id: str,
                    ) -> tuple[Job | None, VmInstance | None, str | None]:
    """Returns the job (locked) that sent command ``command_id``, its VM (locked) and
    the guid of the VM's host.

    In a run of answers the first reads the rows of all the commands they
    answer in one statement (``tx.ahead``) and each takes its own from
    ``tx.run_cache``, once: an answer repeated in the run reads it again.
    """
    rows: dict[str, Sequence[Any] | None] | None = tx.run_cache.get(_READ_AHEAD)
    if rows is None or command_id not in rows:
        ids = {command_id}
        if rows is None:  # the first answer of its run, or alone
            ids.update(incoming.correlation_id for _, incoming in tx.ahead
                       if incoming.correlation_id)
        rows = dict.fromkeys(sorted(ids))
        for read in tx.connection.execute(_JOBS_OF_COMMANDS, {"command_ids": list(rows)}):
            rows[read[_COMMAND_ID]] = read
        if len(rows) > 1:
            tx.run_cache[_READ_AHEAD] = rows
    row = rows.pop(command_id)
    if row is None:
        return None, None, None
    job = _persistent(tx.session, Job, _JOB_COLUMNS, row[:len(_JOB_COLUMNS)])
    vm_values = row[len(_JOB_COLUMNS):-1]
    vm = (_persistent(tx.session, VmInstance, _VM_COLUMNS, vm_values)
          if vm_values[_VM_ID] is not None else None)
    return job, vm, row[-1]


def _persistent(session: Session, cls: type[T], columns: Sequence[tuple[str, Any]],
                values: Sequence[Any]) -> T:
    """Returns an object of ``cls`` made of a row read by Core, in ``session`` as if
    the session had loaded it (no statement; a change is flushed as an UPDATE)."""
    instance = cls(**{key: value for (key, _), value in zip(columns, values, strict=True)})
    make_transient_to_detached(instance)
    session.add(instance)
    return instance


def _command_host(routing_key: str | None) -> str | None:
    """Returns the guid of an ``agent.<guid>.<Type>`` routing key (a command's host)."""
    words = (routing_key or "").split(".")
    return words[1] if len(words) >= 3 and words[0] == "agent" else None


def _sender_text(sender: str | None) -> str:
    """Names the sending host in a refusal."""
    return f"host {sender}" if sender else "a sender naming no host"


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
