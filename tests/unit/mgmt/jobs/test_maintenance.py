"""Host maintenance decisions with scripted agents: statuses, refusals, what keeps a host."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from hostdev.messages import api
from hostdev.messages.commands import ErrorAnswer, MigrateCommand
from hostdev.mgmt.persistence.models import Host
from tests.support.mgmt_harness import Harness, devices


@pytest.fixture
def h(engine: Engine) -> Harness:
    """Hosts g1 and g2 (two 10GE each); offering mig (one 10GE, detach-attach)."""
    harness = Harness(engine)
    harness.register("g1", "h1", devices(2))
    harness.register("g2", "h2", devices(2))
    harness.api(api.CreateOfferingRequest(name="mig", pci_devices="10GE",
                                          migration_policy="detach-attach"))
    return harness


def _host(h: Harness, name: str) -> api.HostList:
    answer = h.api(api.ListHostsRequest(host=name))
    assert isinstance(answer, api.HostList)
    return answer


def _status(h: Harness, name: str) -> tuple[str, str]:
    row = _host(h, name).hosts[0]
    return row.status, row.status_reason


def test_an_empty_host_enters_maintenance_at_once_and_start_ups_keep_it(h: Harness) -> None:
    """No VM: Maintenance in the request itself; a new start-up or ping keeps it."""
    plan = h.api(api.HostMaintenanceRequest(host="h1"))
    assert isinstance(plan, api.MaintenancePlan) and plan.status == "Maintenance"
    assert plan.moves == () and plan.holds == () and plan.job_id is not None
    job = h.api(api.GetJobRequest(job_id=plan.job_id))
    assert isinstance(job, api.JobList) and job.jobs[0].state == "succeeded"
    assert h.events("host.g1.") == ["host.g1.Up", "host.g1.PrepareForMaintenance",
                                    "host.g1.Maintenance"]
    h.register("g1", "h1", devices(2))
    h.ping("g1")
    assert _status(h, "h1") == ("Maintenance", "")
    refused = h.api(api.HostMaintenanceRequest(host="h1"))
    assert isinstance(refused, ErrorAnswer)
    assert refused.details == ("host h1 is in maintenance already; return it with: hostdev "
                               "host activate h1")
    back = h.api(api.ActivateHostRequest(host="h1"))
    assert isinstance(back, api.HostList) and back.hosts[0].status == "Up"


def test_a_vm_with_nowhere_to_go_keeps_the_host_preparing(h: Harness, engine: Engine) -> None:
    """No destination fits: the VM is a problem, the job fails saying so, start-ups keep it."""
    with Session(engine) as session:
        session.execute(update(Host).where(Host.guid == "g2").values(status="Down"))
        session.commit()
    assert isinstance(h.api(api.DeployVmRequest(name="vm1", offering="mig")), api.JobAccepted)
    h.answer()
    plan = h.api(api.HostMaintenanceRequest(host="h1"))
    assert isinstance(plan, api.MaintenancePlan) and plan.moves == ()
    assert plan.problems == ("cannot migrate VM vm1: no host has 1 x 10GE free: h1 is "
                             "avoided, h2 is Down",)
    assert h.commands(MigrateCommand) == []
    job = h.api(api.GetJobRequest(job_id=plan.job_id or 0))
    assert isinstance(job, api.JobList) and job.jobs[0].state == "failed"
    reason = "VM vm1 still runs here: run hostdev host maintenance h1 again to move it"
    assert job.jobs[0].details == f"host h1 stays PrepareForMaintenance: {reason}"
    assert _status(h, "h1") == ("PrepareForMaintenance", reason)
    h.register("g1", "h1", devices(2))
    assert _status(h, "h1")[0] == "PrepareForMaintenance"
    down = h.api(api.HostMaintenanceRequest(host="h2", dry_run=True))
    assert isinstance(down, ErrorAnswer) and down.details.startswith(
        "host h2 is Down: its agent does not answer")
    activated = h.api(api.ActivateHostRequest(host="h1"))
    assert isinstance(activated, api.HostList)
    assert (activated.hosts[0].status, activated.hosts[0].status_reason) == ("Up", "")
    again = h.api(api.ActivateHostRequest(host="h1"))
    assert isinstance(again, ErrorAnswer) and again.details == (
        "host h1 is Up, not in maintenance: nothing to activate (hostdev host maintenance h1 "
        "takes it out)")


def test_a_redelivered_maintenance_request_is_answered_with_its_plan_type(h: Harness) -> None:
    """The same HostMaintenanceRequest delivered twice acts once and answers a plan both times."""
    assert isinstance(h.api(api.DeployVmRequest(name="vm1", offering="mig")), api.JobAccepted)
    h.answer()
    first = h.api(api.HostMaintenanceRequest(host="h1"), message_id="maint-1")
    again = h.api(api.HostMaintenanceRequest(host="h1"), message_id="maint-1")
    assert isinstance(first, api.MaintenancePlan) and isinstance(again, api.MaintenancePlan)
    assert (again.host_name, again.job_id) == ("h1", first.job_id)
    assert again.status == "PrepareForMaintenance"
    jobs = h.api(api.ListJobsRequest())
    assert isinstance(jobs, api.JobList)
    assert [j.id for j in jobs.jobs if j.kind == "maintenance"] == [first.job_id]
