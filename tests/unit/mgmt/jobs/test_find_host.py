"""How an operator's host reference resolves when agents choose their own names."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from hostdev.mgmt.errors import Conflict, NotFound
from hostdev.mgmt.jobs.jobs import find_host
from hostdev.mgmt.persistence.models import Host
from tests.support.databases import add_host


def _guid(engine: Engine, host_id: int) -> str:
    with Session(engine) as session:
        return session.scalars(select(Host.guid).where(Host.id == host_id)).one()


def test_a_guid_wins_over_a_name_another_host_took(engine: Engine) -> None:
    """A host that took another host's guid as its name does not capture references to it."""
    with engine.begin() as conn:
        add_host(conn, name="guid-of-the-victim")  # registered first: the lower id
        victim = int(conn.execute(insert(Host).values(
            guid="guid-of-the-victim", name="kvm-01", status="Up", cpus=8, memory_mb=8192,
            hypervisor_version="test")).inserted_primary_key[0])
    with Session(engine) as session:
        assert find_host(session, "guid-of-the-victim").id == victim


def test_a_name_two_hosts_carry_is_refused_naming_their_guids(engine: Engine) -> None:
    """Two hosts named alike: the reference is ambiguous, never resolved to either."""
    with engine.begin() as conn:
        first, second = add_host(conn, name="kvm-01"), add_host(conn, name="kvm-01")
    with Session(engine) as session, pytest.raises(Conflict) as refused:
        find_host(session, "kvm-01")
    assert _guid(engine, first) in refused.value.reason
    assert _guid(engine, second) in refused.value.reason


def test_a_unique_name_and_an_unknown_reference(engine: Engine) -> None:
    """A name one host carries finds it; an unknown reference lists the hosts."""
    with engine.begin() as conn:
        host = add_host(conn, name="kvm-02")
    with Session(engine) as session:
        assert find_host(session, "kvm-02").id == host
        with pytest.raises(NotFound, match="kvm-02"):
            find_host(session, "kvm-03")
