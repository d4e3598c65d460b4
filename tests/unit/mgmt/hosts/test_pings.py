"""Pings taken in batches still reconcile whatever changed on management's side."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from hostdev.messages import api
from hostdev.messages.codec import domains_digest
from hostdev.messages.commands import PingRoutingCommand
from hostdev.messages.values import DomainInfo
from hostdev.mgmt.persistence.models import Host, VmInstance, utcnow
from tests.support.mgmt_harness import Harness, devices


@pytest.fixture
def h(engine: Engine) -> Harness:
    """One host with 2 x 10GE, an offering of one 10GE, and vm1 Running there."""
    harness = Harness(engine)
    harness.register("g1", "h1", devices(2))
    harness.api(api.CreateOfferingRequest(name="net1", pci_devices="10GE"))
    assert isinstance(harness.api(api.DeployVmRequest(name="vm1", offering="net1")),
                      api.JobAccepted)
    harness.answer()
    return harness


def _batch(h: Harness, *domains: DomainInfo) -> None:
    """Hands one ping of g1 to the service's batch handler, as the bus does with a run."""
    batching = h.bus.batches["hostdev.mgmt"][PingRoutingCommand]
    ping = PingRoutingCommand(guid="g1", domains=domains, domains_digest=domains_digest(domains))
    results = batching.handler([(ping, h.incoming("mgmt.g1.PingRoutingCommand"))])
    assert list(results) == [None]


def _vm(engine: Engine) -> VmInstance:
    with Session(engine) as session:
        return session.scalars(select(VmInstance).where(VmInstance.name == "vm1")).one()


def _age(engine: Engine) -> None:
    """Ages vm1's last transition past the drift grace of agents that number nothing."""
    with Session(engine) as session, session.begin():
        session.execute(update(VmInstance).values(updated_at=utcnow() - timedelta(minutes=1)))


def test_an_unchanged_report_remembers_its_digest_and_changes_nothing(
        h: Harness, engine: Engine) -> None:
    """The first ping is reconciled and remembered; the same again keeps the VM Running."""
    running = tuple(h.domains["g1"].values())
    _batch(h, *running)
    with Session(engine) as session:
        remembered = session.scalar(select(Host.reconciled_digest))
    assert remembered is not None
    _age(engine)
    _batch(h, *running)
    assert _vm(engine).state == "Running"
    with Session(engine) as session:
        assert session.scalar(select(Host.reconciled_digest)) == remembered


def test_a_vm_stopped_by_management_but_still_reported_running_is_followed(
        h: Harness, engine: Engine) -> None:
    """Same report, same digest, but management stopped the VM: the ping is reconciled."""
    running = tuple(h.domains["g1"].values())
    _batch(h, *running)
    assert isinstance(h.api(api.StopVmRequest(vm="vm1")), api.JobAccepted)
    h.answer()  # the agent says stopped, yet its domain keeps running
    assert _vm(engine).state == "Stopped"
    _age(engine)
    _batch(h, *running)
    assert _vm(engine).state == "Running"


def test_a_running_vm_missing_from_a_report_with_a_stale_digest_is_stopped(
        h: Harness, engine: Engine) -> None:
    """A report lacking a Running VM is reconciled even when its digest claims no change."""
    running = tuple(h.domains["g1"].values())
    _batch(h, *running)
    _age(engine)
    batching = h.bus.batches["hostdev.mgmt"][PingRoutingCommand]
    lying = PingRoutingCommand(guid="g1", domains=(), domains_digest=domains_digest(running))
    batching.handler([(lying, h.incoming("mgmt.g1.PingRoutingCommand"))])
    assert _vm(engine).state == "Stopped"
