"""The unit of work: one transaction for Core and ORM writes, the outbox, retries."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from hostdev.messages.events import JobFinished
from hostdev.mgmt.persistence.database import RetryTransaction
from hostdev.mgmt.persistence.models import (
    Host,
    OutboxEvent,
    ServiceOffering,
    VmInstance,
    utcnow,
)
from hostdev.mgmt.persistence.outbox import OutboxPublisher, message_id_of
from hostdev.mgmt.persistence.unit_of_work import AlreadyHandled, TxContext, UnitOfWork
from hostdev.mgmt.vms.vm_lifecycle import VmLifecycleManager
from hostdev.mgmt.vms.vm_states import VmEvent
from tests.support.mgmt_harness import RecordingBus


def _host(guid: str) -> Host:
    return Host(guid=guid, name=guid, status="Up", cpus=1, memory_mb=1,
                hypervisor_version="", migration_uri="")


def _count(engine: Engine, model: type[Host] | type[OutboxEvent]) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


def _event() -> JobFinished:
    return JobFinished(job_id=1, job_kind="deploy", state="succeeded", at=utcnow().isoformat())


def test_orm_and_outbox_writes_commit_together(engine: Engine) -> None:
    """What the session adds is flushed and committed with the outbox rows, ids as stored."""
    bus = RecordingBus()
    work = UnitOfWork(engine, OutboxPublisher(engine, bus))

    def write(tx: TxContext) -> int:
        tx.session.add(_host("g-1"))
        tx.outbox.add("job.1.Succeeded", _event())
        tx.outbox.add("job.2.Succeeded", _event())
        tx.outbox.flush()
        tx.outbox.add("job.3.Succeeded", _event())
        return tx.connection.execute(select(func.count()).select_from(Host)).scalar_one()

    assert work.run(write) == 0  # the session flushes at the end, not on a Core read
    assert _count(engine, Host) == 1
    with engine.connect() as conn:
        stored = conn.execute(select(OutboxEvent.id, OutboxEvent.message_id,
                                     OutboxEvent.routing_key)
                              .order_by(OutboxEvent.id)).all()
    assert [key for _, _, key in stored] == [f"job.{n}.Succeeded" for n in (1, 2, 3)]
    assert [p.message_id for p in bus.published] == [
        message_id_of(row_id, mid) for row_id, mid, _ in stored]
    assert all(len(mid) == 32 for _, mid, _ in stored)  # random, not the row's number


def test_a_failed_attempt_undoes_orm_and_core_writes(engine: Engine) -> None:
    """A lost race rolls back everything the attempt wrote; the retry starts clean."""
    attempts: list[int] = []

    def write(tx: TxContext) -> None:
        tx.session.add(_host(f"g-{len(attempts)}"))
        tx.session.flush()
        tx.outbox.send("agent.x.Ping", _event())
        attempts.append(1)
        if len(attempts) == 1:
            raise RetryTransaction("lost")

    UnitOfWork(engine).run(write)
    assert len(attempts) == 2
    assert (_count(engine, Host), _count(engine, OutboxEvent)) == (1, 1)


def test_a_message_is_handled_once(engine: Engine) -> None:
    """The message id is recorded in the transaction; a redelivery raises AlreadyHandled."""
    work = UnitOfWork(engine)
    work.run(lambda tx: tx.outbox.add("job.1.Succeeded", _event()), message_id="m-1")
    with pytest.raises(AlreadyHandled):
        work.run(lambda tx: tx.outbox.add("job.1.Succeeded", _event()), message_id="m-1")
    assert _count(engine, OutboxEvent) == 1


def _stopped_vm(engine: Engine, uuid: str) -> int:
    with Session(engine) as session:
        offering = ServiceOffering(name=f"o-{uuid}", cpus=1, memory_mb=1)
        session.add(offering)
        session.flush()
        vm = VmInstance(uuid=uuid, name=uuid, offering_id=offering.id, state="Stopped",
                        update_count=0, cpus=1, memory_mb=1)
        session.add(vm)
        session.commit()
        return vm.id


def _answer_stamp(engine: Engine, vm_id: int) -> tuple[str, str | None, int | None]:
    with engine.connect() as conn:
        row = conn.execute(select(VmInstance.state, VmInstance.answer_boot_id,
                                  VmInstance.answer_seq).where(VmInstance.id == vm_id)).one()
    return row[0], row[1], row[2]


def test_vm_values_ride_on_the_vms_next_transition(engine: Engine) -> None:
    """Columns queued in ``vm_values`` are written by the transition's UPDATE and dequeued."""
    vm_id = _stopped_vm(engine, "vm-a")
    lifecycle = VmLifecycleManager()

    def answer(tx: TxContext) -> dict[int, dict[str, object]]:
        tx.vm_values[vm_id] = {"answer_boot_id": "boot-1", "answer_seq": 7}
        vm = tx.session.get(VmInstance, vm_id)
        assert vm is not None
        lifecycle.transition(tx, vm, VmEvent.START_REQUESTED)
        return dict(tx.vm_values)

    assert UnitOfWork(engine).run(answer) == {}  # nothing left for the flush
    assert _answer_stamp(engine, vm_id) == ("Starting", "boot-1", 7)


def test_vm_values_without_a_transition_are_written_before_the_commit(engine: Engine) -> None:
    """An answer that moves no VM still records its columns, in the same transaction."""
    vm_id = _stopped_vm(engine, "vm-b")

    def answer(tx: TxContext) -> None:
        tx.vm_values[vm_id] = {"answer_boot_id": "boot-2", "answer_seq": 3}

    UnitOfWork(engine).run(answer)
    assert _answer_stamp(engine, vm_id) == ("Stopped", "boot-2", 3)


def test_the_works_of_a_run_write_their_outbox_rows_together_in_order(engine: Engine) -> None:
    """run_each: every work's events and commands are one batch of rows, in the works' order,
    published after the one commit; each work's command id is the id its row keeps."""
    bus = RecordingBus()
    work = UnitOfWork(engine, OutboxPublisher(engine, bus))
    sent: list[str] = []

    def one(n: int) -> Callable[[TxContext], int]:
        def write(tx: TxContext) -> int:
            tx.outbox.add(f"job.{n}.Succeeded", _event())
            sent.append(tx.outbox.send(f"agent.g{n}.Ping", _event()))
            return _count_rows(tx)
        return write

    seen = work.run_each([(one(1), "m-1"), (one(2), "m-2")])

    assert seen == [0, 0]  # written by one INSERT before the commit, after both works
    with engine.connect() as conn:
        stored = conn.execute(select(OutboxEvent.routing_key, OutboxEvent.message_id)
                              .order_by(OutboxEvent.id)).all()
    assert [key for key, _ in stored] == ["job.1.Succeeded", "agent.g1.Ping",
                                          "job.2.Succeeded", "agent.g2.Ping"]
    assert [mid for key, mid in stored if key.startswith("agent.")] == sent
    assert [p.routing_key for p in bus.published] == [key for key, _ in stored]


def test_a_run_holding_an_id_handled_before_records_none(engine: Engine) -> None:
    """The ids of a run are recorded together: one handled before refuses the whole run."""
    work = UnitOfWork(engine)
    work.run(lambda tx: None, message_id="m-2")
    with pytest.raises(AlreadyHandled, match="m-1, m-2"):
        work.run_each([(lambda tx: tx.outbox.add("job.1.Succeeded", _event()), "m-1"),
                       (lambda tx: None, "m-2")])
    assert _count(engine, OutboxEvent) == 0
    work.run(lambda tx: None, message_id="m-1")  # not recorded by the refused run


def _count_rows(tx: TxContext) -> int:
    return int(tx.connection.execute(select(func.count()).select_from(OutboxEvent))
               .scalar_one())
