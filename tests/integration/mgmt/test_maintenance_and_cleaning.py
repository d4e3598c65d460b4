"""Host maintenance and device cleaning over the broker: real agents on simulated hosts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hostdev.messages import api
from hostdev.messages.errors import RemoteError
from hostdev.messages.pci_address import PciAddress
from tests.support.broker_cloud import BrokerCloud, broker_cloud
from tests.support.databases import mariadb_database, sqlite_database
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.libvirt]


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def cloud(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerCloud]:
    """Management and three agents (sim-a, sim-b, sim-c; four 10GE each) on a fresh database."""
    databases = {"sqlite": lambda: sqlite_database(tmp_path),
                 "mariadb": lambda: mariadb_database("hostdev_maint")}
    with databases[request.param]() as db_url, broker_cloud(db_url, tmp_path) as created:
        for name in ("sim-a", "sim-b", "sim-c"):
            created.add_host(name)
        created.request(api.CreateOfferingRequest(name="mig", pci_devices="10GE",
                                                  migration_policy="detach-attach"))
        created.request(api.CreateOfferingRequest(name="pin", pci_devices="10GE",
                                                  migration_policy="forbid"))
        yield created


def _running_on(cloud: BrokerCloud, vm: str) -> str | None:
    row = cloud.vm(vm)
    return row.host_name if row.state == "Running" else None


def test_maintenance_moves_detach_attach_vms_and_stops_forbid_ones_when_told(
        cloud: BrokerCloud) -> None:
    """Dry run plans; the run moves detach-attach VMs and devices; --stop empties the host."""
    uuids = {name: cloud.deploy(name, offering, on="sim-a")
             for name, offering in (("m1", "mig"), ("m2", "mig"), ("f1", "pin"))}
    before = {name: cloud.vm(name).pci_devices for name in uuids}

    status, text = cloud.cli("host", "maintenance", "sim-a", "--dry-run")
    assert status == 0, text
    assert text.startswith("dry run: sim-a: would move 2 VM(s), 1 forbid migration; "
                           "nothing was changed")
    plan = cloud.request(api.HostMaintenanceRequest(host="sim-a", dry_run=True))
    assert isinstance(plan, api.MaintenancePlan) and plan.job_id is None
    assert [(m.vm_name, [d.source for d in m.devices]) for m in plan.moves] == [
        ("m1", list(before["m1"])), ("m2", list(before["m2"]))]
    targets = [(m.destination_name, d.destination) for m in plan.moves for d in m.devices]
    assert len(set(targets)) == 2 and all(name != "sim-a" for name, _ in targets)
    for move in plan.moves:
        for device in move.devices:
            assert f"{move.vm_name}  {move.destination_name}" in text
            assert f"{device.source}  {device.destination}" in text
    assert [(h.vm_name, h.offering, h.devices) for h in plan.holds] == [
        ("f1", "pin", before["f1"])]
    assert cloud.host("sim-a").status == "Up"
    assert {name: _running_on(cloud, name) for name in uuids} == dict.fromkeys(uuids, "sim-a")

    begun = cloud.request(api.HostMaintenanceRequest(host="sim-a"))
    assert isinstance(begun, api.MaintenancePlan) and begun.job_id is not None
    assert begun.status == "PrepareForMaintenance"
    assert [h.vm_name for h in begun.holds] == ["f1"] and begun.holds[0].stop_job_id is None
    with pytest.raises(RemoteError, match="sim-a is PrepareForMaintenance"):
        cloud.request(api.DeployVmRequest(name="late", offering="mig", avoid=("sim-b", "sim-c")))
    job = cloud.wait_job(begun.job_id)
    assert job.state == "failed" and "f1" in job.details and "--stop" in job.details
    for move in begun.moves:
        assert move.job_id is not None and cloud.wait_job(move.job_id).state == "succeeded"
        row = cloud.vm(move.vm_name)
        assert (row.state, row.host_name) == ("Running", move.destination_name)
        assert row.pci_devices == tuple(d.destination for d in move.devices)
        domain = cloud.agents[move.destination_name].host.domain(uuids[move.vm_name])
        assert domain is not None and set(domain.hostdevs) == set(row.pci_devices)
        assert cloud.agents["sim-a"].host.domain(uuids[move.vm_name]) is None
    host = cloud.host("sim-a")
    assert host.status == "PrepareForMaintenance" and "VM f1" in host.status_reason
    # The agent's pings go on and do not bring the host back to Up.
    pinged = host.last_ping
    wait_for(lambda: cloud.host("sim-a").last_ping != pinged, timeout=10, what="a ping")
    assert cloud.host("sim-a").status == "PrepareForMaintenance"

    status, text = cloud.cli("host", "maintenance", "sim-a", "--stop", "--wait")
    assert status == 0, text
    assert cloud.vm("f1").state == "Stopped"
    host = cloud.host("sim-a")
    assert (host.status, host.status_reason) == ("Maintenance", "")
    assert cloud.devices("sim-a") == dict.fromkeys(
        ("0000:28:00.0", "0000:28:00.1", "0000:28:00.2", "0000:28:00.3"), ("free", "", None))
    explanation = cloud.request(api.ExplainPlacementRequest(offering="mig"))
    assert isinstance(explanation, api.PlacementExplanation)
    (verdict,) = [v for v in explanation.verdicts if v.host_name == "sim-a"]
    assert not verdict.accepted and "Maintenance" in verdict.reason
    free = cloud.request(api.ListPciDevicesRequest(host="sim-a", free_only=True))
    assert isinstance(free, api.PciDeviceList) and free.devices == ()
    # A restarted agent announces itself again: the host stays in maintenance.
    agent = cloud.agents["sim-a"].agent
    announced = agent.announcements
    agent.bus.call_soon_threadsafe(agent.announce)
    wait_for(lambda: agent.announcements > announced and agent.registered, timeout=10,
             what="a new start-up answered")
    assert cloud.host("sim-a").status == "Maintenance"

    status, text = cloud.cli("host", "activate", "sim-a")
    assert status == 0 and "sim-a" in text and " Up " in text
    assert cloud.deploy("back", "mig", on="sim-a")
    with pytest.raises(RemoteError, match="sim-a is Up, not in maintenance: nothing to activate"):
        cloud.request(api.ActivateHostRequest(host="sim-a"))


def test_failed_migration_leaves_the_host_preparing_with_the_reason(cloud: BrokerCloud) -> None:
    """A migration that fails keeps the host PrepareForMaintenance; host and job say why."""
    cloud.deploy("m1", "mig", on="sim-b")
    cloud.agents["sim-b"].host.fail_migrations("the destination refused the guest's memory")
    begun = cloud.request(api.HostMaintenanceRequest(host="sim-b"))
    assert isinstance(begun, api.MaintenancePlan) and begun.job_id is not None
    (move,) = begun.moves
    assert move.job_id is not None
    migration = cloud.wait_job(move.job_id)
    assert migration.state == "failed"
    assert "the destination refused the guest's memory" in migration.details
    job = cloud.wait_job(begun.job_id)
    assert job.state == "failed" and f"migrate job {move.job_id} failed" in job.details
    host = cloud.host("sim-b")
    assert host.status == "PrepareForMaintenance"
    assert "the destination refused the guest's memory" in host.status_reason
    assert _running_on(cloud, "m1") == "sim-b"
    status, text = cloud.cli("host", "show", "sim-b")
    assert status == 0 and "the destination refused the guest's memory" in text
    # Fixed, and asked again: the host empties and reaches maintenance.
    cloud.agents["sim-b"].host.fail_migrations(None)
    again = cloud.request(api.HostMaintenanceRequest(host="sim-b"))
    assert isinstance(again, api.MaintenancePlan) and again.job_id is not None
    assert cloud.wait_job(again.job_id).state == "succeeded"
    assert cloud.host("sim-b").status == "Maintenance"
    assert _running_on(cloud, "m1") in ("sim-a", "sim-c")


@pytest.fixture
def resetting(cloud: BrokerCloud) -> BrokerCloud:
    """The cloud with sim-r, whose agent resets every device a VM lets go of."""
    cloud.add_host("sim-r", **{"pci.reset.on.release": "true"})
    assert cloud.host("sim-r").reset_on_release
    return cloud


def _device_of(cloud: BrokerCloud, vm: str) -> str:
    (address,) = cloud.vm(vm).pci_devices
    return str(address)


def test_a_released_device_is_reset_by_its_agent_then_offered(resetting: BrokerCloud) -> None:
    """Stopped or migrated away, a device is reset by the agent once, then free again."""
    cloud = resetting
    sim_r = cloud.agents["sim-r"].host
    cloud.deploy("v1", "mig", on="sim-r")
    address = _device_of(cloud, "v1")
    stop = cloud.request(api.StopVmRequest(vm="v1"))
    assert isinstance(stop, api.JobAccepted)
    assert cloud.wait_job(stop.job_id).state == "succeeded"
    wait_for(lambda: cloud.devices("sim-r")[address] == ("free", "", None), timeout=10,
             what=f"{address} reset and free")
    assert {str(a): n for a, n in sim_r.resets.items()} == {address: 1}
    cloud.deploy("v2", "mig", on="sim-r")
    moved_from = _device_of(cloud, "v2")
    migrate = cloud.request(api.MigrateVmRequest(vm="v2", destination="sim-a"))
    assert isinstance(migrate, api.JobAccepted)
    assert cloud.wait_job(migrate.job_id).state == "succeeded"
    wait_for(lambda: cloud.devices("sim-r")[moved_from] == ("free", "", None), timeout=10,
             what=f"{moved_from} reset after the migration")
    assert sum(sim_r.resets.values()) == 2


def test_a_failed_reset_quarantines_the_device_until_enabled(resetting: BrokerCloud) -> None:
    """A reset that fails leaves the device quarantined with the agent's reason; enable retries."""
    cloud = resetting
    sim_r = cloud.agents["sim-r"].host
    cloud.deploy("v1", "mig", on="sim-r")
    address = _device_of(cloud, "v1")
    sim_r.fail_resets([PciAddress(address)])
    stop = cloud.request(api.StopVmRequest(vm="v1"))
    assert isinstance(stop, api.JobAccepted)
    assert cloud.wait_job(stop.job_id).state == "succeeded"
    _, reason, holder = wait_for(
        lambda: (row if (row := cloud.devices("sim-r")[address])[0] == "quarantined" else None),
        timeout=10, what=f"{address} quarantined")
    assert reason == f"reset failed: simulated failure resetting {address} (fail_reset)"
    assert holder is None and sim_r.resets == {}
    cloud.deploy("v2", "mig", on="sim-r")
    assert _device_of(cloud, "v2") != address  # never offered while quarantined
    sim_r.fail_resets([])
    status, text = cloud.cli("device", "enable", "sim-r", address)
    assert status == 0 and "cleaning" in text
    wait_for(lambda: cloud.devices("sim-r")[address] == ("free", "", None), timeout=10,
             what=f"{address} reset on enable")
    assert {str(a): n for a, n in sim_r.resets.items()} == {address: 1}
