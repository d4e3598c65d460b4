"""Known hosts announcing themselves again, in batches, on MariaDB and SQLite.

A run's start-ups of known hosts whose devices and domains did not change
are registered in the run's transaction; each must end exactly as if
registered alone (host row, devices, VMs, events, answer). A host whose
domains or devices changed, or whose devices the rules tie together, goes
the full path alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from hostdev.messages import api
from hostdev.messages.codec import domains_digest
from hostdev.messages.commands import PingRoutingCommand, StartupAnswer, StartupRoutingCommand
from hostdev.messages.values import DomainInfo, PciDeviceInfo
from hostdev.mgmt.persistence.models import Host, PciDevice, VmInstance, utcnow
from tests.integration.mgmt.test_startup_batches import (
    _DEVICE_IDENTITY,
    RULED,
    _devices,
    _host,
    _items,
    _run,
    _without,
)
from tests.support.databases import migrated_engine
from tests.support.mgmt_harness import Harness, devices

#: Columns that differ between two hosts announced alike (identity and time).
_HOST_IDENTITY = {"id", "guid", "name", "migration_uri", "created_at", "updated_at", "last_ping",
                  "reconciled_digest"}


@pytest.fixture(params=[pytest.param("mariadb", marks=pytest.mark.mariadb), "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated database: MariaDB or an SQLite file."""
    with migrated_engine(request.param, tmp_path, "hostdev_restarts") as created:
        yield created


def _startup(guid: str, pci: Sequence[PciDeviceInfo], *, boot: str = "boot-1", seq: int = 1,
             domains: tuple[DomainInfo, ...] = ()) -> StartupRoutingCommand:
    return StartupRoutingCommand(
        guid=guid, name=f"host-{guid}", cpus=48, memory_mb=196608, hypervisor_version="9.0.0",
        migration_uri=f"qemu+tcp://{guid}/system", pci_devices=tuple(pci), domains=domains,
        boot_id=boot, seq=seq)


def _registered(harness: Harness, *guids: str, pci: Sequence[PciDeviceInfo] = devices(3)) -> None:
    for guid in guids:
        assert isinstance(harness.from_agent(guid, _startup(guid, pci)), StartupAnswer)


def _taken(harness: Harness, *startups: StartupRoutingCommand) -> list[Any]:
    """What the start-up batch takes of a run (a StartupAnswer) and hands back (False)."""
    run = _items(harness, *startups)
    return list(harness.service.work.run(
        lambda tx: harness.service.startups.on_startups(tx, run)))


def _silent(engine: Engine, harness: Harness, *guids: str) -> None:
    """Makes hosts silent long enough to be Disconnected, and sweeps."""
    with engine.begin() as conn:
        conn.execute(update(Host).where(Host.guid.in_(guids))
                     .values(last_ping=utcnow() - timedelta(seconds=100)))
    harness.service.sweep_hosts()
    assert {_host(engine, guid)["status"] for guid in guids} == {"Disconnected"}


def test_unchanged_known_hosts_are_registered_in_the_run_as_alone(engine: Engine) -> None:
    """Two restarted agents, hosts Disconnected: taken in the run, ending as twins alone."""
    harness = Harness(engine)
    _registered(harness, "k1", "k2", "t1", "t2")
    _silent(engine, harness, "k1", "k2", "t1", "t2")
    for guid in ("t1", "t2"):
        assert isinstance(harness.from_agent(guid, _startup(guid, devices(3), boot="boot-2")),
                          StartupAnswer)
    before = len(harness.events("host."))

    taken = _taken(harness, *(_startup(g, devices(3), boot="boot-2") for g in ("k1", "k2")))

    assert [type(t) for t in taken] == [StartupAnswer, StartupAnswer]
    for result, guid in zip(taken, ("k1", "k2"), strict=True):
        host = _host(engine, guid)
        assert result.host_id == host["id"]
        assert result.details == f"registered host-{guid} with 3 PCI devices"
    for batched, alone in (("k1", "t1"), ("k2", "t2")):
        host, twin = _host(engine, batched), _host(engine, alone)
        assert _without(host, _HOST_IDENTITY) == _without(twin, _HOST_IDENTITY)
        assert (host["status"], host["report_boot_id"], host["retired_boot_id"]) == (
            "Up", "boot-2", "boot-1")
        assert [_without(d, _DEVICE_IDENTITY) for d in _devices(engine, host["id"])] \
            == [_without(d, _DEVICE_IDENTITY) for d in _devices(engine, twin["id"])]
    assert harness.events("host.")[before:] == ["host.k1.Up", "host.k2.Up"]


def _running_vm(harness: Harness) -> tuple[DomainInfo, ...]:
    """Deploys vm1 on k1, runs it, pings: k1's domains as its agent reports them."""
    harness.api(api.CreateOfferingRequest(name="net1", pci_devices="10GE"))
    assert isinstance(harness.api(api.DeployVmRequest(name="vm1", offering="net1")),
                      api.JobAccepted)
    assert harness.answer() == 1
    domains = tuple(harness.domains["k1"].values())
    # Pinged as an agent pings: with the digest of its domains (remembered once reconciled).
    harness.from_agent("k1", PingRoutingCommand(guid="k1", domains=domains,
                                                domains_digest=domains_digest(domains)))
    return domains


def _vm_state(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.scalar(select(VmInstance.state).where(VmInstance.name == "vm1")))


def test_a_known_host_still_running_its_vm_is_taken(engine: Engine) -> None:
    """k1 reports the domain of its Running VM again: taken; the VM stays Running."""
    harness = Harness(engine)
    _registered(harness, "k1")
    domains = _running_vm(harness)

    taken = _taken(harness, _startup("k1", devices(3), boot="boot-2", domains=domains))

    assert isinstance(taken[0], StartupAnswer)
    assert _vm_state(engine) == "Running"


def test_a_known_host_whose_vm_is_gone_is_reconciled_alone(engine: Engine) -> None:
    """k1 restarts without the domain of its Running VM: handed back, and alone it stops."""
    harness = Harness(engine)
    _registered(harness, "k1")
    _running_vm(harness)
    restart = _startup("k1", devices(3), boot="boot-2")

    assert _taken(harness, restart) == [False]

    results = _run(harness, restart, _startup("k2", devices(1)))
    assert all(isinstance(r, StartupAnswer) for r in results)
    assert _vm_state(engine) == "Stopped"


def test_a_known_host_with_one_device_fewer_goes_alone(engine: Engine) -> None:
    """One device fewer: handed back, and alone the missing one is removed."""
    harness = Harness(engine)
    _registered(harness, "fewer")

    assert _taken(harness, _startup("fewer", devices(2), boot="boot-2")) == [False]

    results = _run(harness, _startup("fewer", devices(2), boot="boot-2"),
                   _startup("other", devices(1)))
    assert all(isinstance(r, StartupAnswer) for r in results)
    assert [d["state"] for d in _devices(engine, _host(engine, "fewer")["id"])] \
        == ["free", "free", "removed"]


def test_a_ruled_host_whose_rows_follow_the_rules_is_taken_as_alone(engine: Engine) -> None:
    """Devices the rules tie together, unchanged: taken, rows as its twin's alone."""
    harness = Harness(engine)
    _registered(harness, "ruled", "twin", pci=RULED)
    assert isinstance(harness.from_agent("twin", _startup("twin", RULED, boot="boot-2")),
                      StartupAnswer)

    taken = _taken(harness, _startup("ruled", RULED, boot="boot-2"))

    assert isinstance(taken[0], StartupAnswer)
    host, twin = _host(engine, "ruled"), _host(engine, "twin")
    assert host["device_rules"] and _without(host, _HOST_IDENTITY) == _without(
        twin, _HOST_IDENTITY)
    assert [_without(d, _DEVICE_IDENTITY) for d in _devices(engine, host["id"])] \
        == [_without(d, _DEVICE_IDENTITY) for d in _devices(engine, twin["id"])]


def test_a_ruled_host_whose_rows_break_the_rules_goes_alone(engine: Engine) -> None:
    """A withheld device found free (rows out of step): handed back; alone it is unavailable."""
    harness = Harness(engine)
    _registered(harness, "ruled", pci=RULED)
    with engine.begin() as conn:
        conn.execute(update(PciDevice).where(PciDevice.bus == "41")
                     .values(state="free", reason=""))

    assert _taken(harness, _startup("ruled", RULED, boot="boot-2")) == [False]

    _run(harness, _startup("ruled", RULED, boot="boot-2"), _startup("other", devices(1)))
    states = [(d["bus"], d["state"]) for d in _devices(engine, _host(engine, "ruled")["id"])]
    assert states[0] == ("41", "unavailable")
