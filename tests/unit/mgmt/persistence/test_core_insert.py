"""``insert_object``: a transient ORM object written by one Core INSERT, as a flush writes it."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from hostdev.mgmt.persistence.core_insert import insert_object
from hostdev.mgmt.persistence.models import Host, Job, ServiceOffering, VmInstance


def _offering(engine: Engine) -> int:
    with Session(engine) as session, session.begin():
        offering = ServiceOffering(name="small", cpus=1, memory_mb=512)
        session.add(offering)
        session.flush()
        return offering.id


def _row(engine: Engine, model: Any, row_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(select(model.__table__)
                                 .where(model.__table__.c.id == row_id)).one()._mapping)


def test_an_inserted_object_gets_its_id_and_the_row_a_flush_would_write(engine: Engine) -> None:
    """Set attributes are written, unset ones take their defaults (on the object too)."""
    offering_id = _offering(engine)
    with engine.begin() as conn:
        vm = VmInstance(uuid="u-1", name="vm1", offering_id=offering_id, state="Stopped",
                        update_count=0, cpus=2, memory_mb=1024)
        vm_id = insert_object(conn, vm)
        job = Job(kind="deploy", state="running", vm_id=vm_id, step="start",
                  command_id="c-1")
        job_id = insert_object(conn, job)
    with Session(engine) as session, session.begin():
        twin = VmInstance(uuid="u-2", name="vm1", offering_id=offering_id, state="Stopped",
                          update_count=0, cpus=2, memory_mb=1024)
        session.add(twin)
        session.flush()
        twin_id = twin.id

    assert (vm.id, job.id) == (vm_id, job_id)
    stored, flushed = _row(engine, VmInstance, vm_id), _row(engine, VmInstance, twin_id)
    moments = {"id", "uuid", "created_at", "updated_at"}
    assert {k: v for k, v in stored.items() if k not in moments} \
        == {k: v for k, v in flushed.items() if k not in moments}
    assert stored["created_at"] == vm.created_at is not None
    job_row = _row(engine, Job, job_id)
    assert (job_row["details"], job_row["payload"], job_row["command_id"],
            job_row["finished_at"]) == ("", "{}", "c-1", None)
    assert (job.details, job.payload) == ("", "{}")


def test_a_column_with_only_a_server_default_must_be_given(engine: Engine) -> None:
    """NULL would override a server default: such a column left unset is refused."""
    with engine.begin() as conn, pytest.raises(TypeError, match="server default"):
        insert_object(conn, Host(guid="g", name="g", status="Up", cpus=1, memory_mb=1,
                                 hypervisor_version=""))
