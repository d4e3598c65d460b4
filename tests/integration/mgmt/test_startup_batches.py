"""Start-ups in batches on MariaDB and SQLite: new hosts at once, everything else alone.

A run's new hosts must end exactly as if each had been registered alone (the
host row, its devices in the states the hardware rules give them, its event,
its answer); a known host, or anything unusual, goes the full path; a forged
or refused start-up costs no other.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from hostdev.messages.bus.contract import MGMT_QUEUE, Incoming
from hostdev.messages.codec import decode, encode
from hostdev.messages.commands import StartupAnswer, StartupRoutingCommand
from hostdev.messages.events import HostStatusChanged
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DomainInfo, PciDeviceInfo
from hostdev.mgmt.errors import Forbidden, InvalidRequest
from hostdev.mgmt.persistence.models import Host, PciDevice
from tests.support.databases import migrated_engine
from tests.support.mgmt_harness import Harness, devices

BOOT = "b00t"
#: A host whose devices the rules tie together: a withheld one, a group of two, a plain one.
RULED = (
    PciDeviceInfo(address=PciAddress("41:00.0"), name="GPU", iommu_group=7,
                  withheld="IOMMU group 7 has 41:00.2, which pci.devices does not list"),
    PciDeviceInfo(address=PciAddress("42:00.0"), name="10GE", iommu_group=8),
    PciDeviceInfo(address=PciAddress("42:00.1"), name="10GE", iommu_group=8),
    PciDeviceInfo(address=PciAddress("43:00.0"), name="10GE", iommu_group=9, numa_node=1),
)
#: Columns that differ between two hosts registered alike (identity and time).
_HOST_IDENTITY = {"id", "guid", "name", "migration_uri", "created_at", "updated_at", "last_ping"}
_DEVICE_IDENTITY = {"id", "host_id", "created_at", "updated_at"}


@pytest.fixture(params=[pytest.param("mariadb", marks=pytest.mark.mariadb), "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated database: MariaDB or an SQLite file."""
    with migrated_engine(request.param, tmp_path, "hostdev_startups") as created:
        yield created


def _startup(guid: str, pci: Sequence[PciDeviceInfo], *, seq: int = 1,
             domains: tuple[DomainInfo, ...] = ()) -> StartupRoutingCommand:
    return StartupRoutingCommand(
        guid=guid, name=f"host-{guid}", cpus=48, memory_mb=196608, hypervisor_version="9.0.0",
        migration_uri=f"qemu+tcp://{guid}/system", pci_devices=tuple(pci), domains=domains,
        boot_id=BOOT, seq=seq, pci_reset_on_release=True)


def _run(harness: Harness, *startups: StartupRoutingCommand,
         user_ids: dict[str, str] | None = None) -> Sequence[Any]:
    """Hands a run of start-ups to the service's batch handler, as the bus would."""
    batching = harness.bus.batches[MGMT_QUEUE][StartupRoutingCommand]
    items = [(decode(encode(s)),
              harness.incoming(f"mgmt.{s.guid}.StartupRoutingCommand",
                               user_id=(user_ids or {}).get(s.guid, "guest")))
             for s in startups]
    return batching.handler(items)


def _items(harness: Harness,
           *startups: StartupRoutingCommand) -> list[tuple[StartupRoutingCommand, Incoming]]:
    return [(s, harness.incoming(f"mgmt.{s.guid}.StartupRoutingCommand")) for s in startups]


def _host(engine: Engine, guid: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(select(Host.__table__).where(Host.guid == guid)).one()._mapping)


def _devices(engine: Engine, host_id: int) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(PciDevice.__table__).where(PciDevice.host_id == host_id)
                            .order_by(PciDevice.bus, PciDevice.slot, PciDevice.function))
        return [dict(row._mapping) for row in rows]


def _without(row: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in keys}


def test_a_run_of_new_hosts_is_registered_as_each_would_be_alone(engine: Engine) -> None:
    """Rows, ruled devices, events and answers of a batch equal those of start-ups alone."""
    harness = Harness(engine)
    harness.from_agent("s1", _startup("s1", RULED))
    harness.from_agent("s2", _startup("s2", devices(3)))
    alone_events = len(harness.events("host."))

    results = _run(harness, _startup("b1", RULED), _startup("b2", devices(3)))

    for batched, alone in (("b1", "s1"), ("b2", "s2")):
        host, twin = _host(engine, batched), _host(engine, alone)
        assert _without(host, _HOST_IDENTITY) == _without(twin, _HOST_IDENTITY)
        assert [_without(d, _DEVICE_IDENTITY) for d in _devices(engine, host["id"])] \
            == [_without(d, _DEVICE_IDENTITY) for d in _devices(engine, twin["id"])]
    b1 = _host(engine, "b1")
    states = [(d["name"], d["state"], d["reason"]) for d in _devices(engine, b1["id"])]
    assert states == [("GPU", "unavailable", RULED[0].withheld), ("10GE", "free", ""),
                      ("10GE", "free", ""), ("10GE", "free", "")]
    assert _host(engine, "b1")["device_rules"] and not _host(engine, "b2")["device_rules"]
    assert _host(engine, "b1")["report_seq"] == 1 and _host(engine, "b1")["report_boot_id"] == BOOT

    assert [type(r) for r in results] == [StartupAnswer, StartupAnswer]
    for result, guid, count in zip(results, ("b1", "b2"), (4, 3), strict=True):
        assert result.host_id == _host(engine, guid)["id"]
        assert result.details == f"registered host-{guid} with {count} PCI devices"
    events = [p for p in harness.bus.published if p.routing_key.startswith("host.")]
    assert [e.routing_key for e in events[alone_events:]] == ["host.b1.Up", "host.b2.Up"]
    assert all(isinstance(e.message, HostStatusChanged) and e.message.previous is None
               for e in events)


def test_a_run_hands_back_what_only_the_full_path_may_register(engine: Engine) -> None:
    """Known hosts, reported domains, doubled addresses and guids go alone; new hosts at once."""
    harness = Harness(engine)
    harness.from_agent("known", _startup("known", devices(3)))
    stray = DomainInfo(uuid=str(uuid.uuid4()), name="stray", state="running")
    doubled = (*devices(2), devices(1)[0])
    run = _items(harness, _startup("known", devices(2), seq=2), _startup("fresh", devices(2)),
                 _startup("domains", devices(1), domains=(stray,)),
                 _startup("doubled", doubled), _startup("twice", devices(1)),
                 _startup("twice", devices(1), seq=2))

    taken = harness.service.work.run(lambda tx: harness.service.startups.on_startups(tx, run))

    assert [isinstance(t, StartupAnswer) for t in taken] == [False, True, False, False, False,
                                                              False]
    assert not any(t is True for t in taken)
    with engine.connect() as conn:
        assert set(conn.scalars(select(Host.guid))) == {"known", "fresh"}


def test_a_known_host_in_a_run_is_reconciled_in_full(engine: Engine) -> None:
    """A restarting host's start-up, in a run with a new host, reconciles its inventory."""
    harness = Harness(engine)
    harness.from_agent("known", _startup("known", devices(3)))
    stray = DomainInfo(uuid=str(uuid.uuid4()), name="stray", state="running")

    results = _run(harness, _startup("known", devices(2), seq=2), _startup("fresh", devices(2)),
                   _startup("domains", devices(1), domains=(stray,)))

    assert all(isinstance(r, StartupAnswer) for r in results)
    known = _host(engine, "known")
    assert [d["state"] for d in _devices(engine, known["id"])] == ["free", "free", "removed"]
    assert known["report_seq"] == 2
    assert _host(engine, "domains")["foreign_domains"] == 1
    assert [d["state"] for d in _devices(engine, _host(engine, "fresh")["id"])] == ["free"] * 2


def test_a_forged_or_refused_start_up_in_a_run_costs_no_other(engine: Engine) -> None:
    """A start-up forged by another agent and one listing an address twice fail alone."""
    harness = Harness(engine)
    doubled = (*devices(2), devices(1)[0])

    results = _run(harness, _startup("g1", devices(2)), _startup("g2", devices(2)),
                   _startup("g3", doubled), _startup("g4", devices(2)),
                   user_ids={"g2": "agent-g9"})

    assert isinstance(results[0], StartupAnswer) and isinstance(results[3], StartupAnswer)
    assert isinstance(results[1], Forbidden) and "agent-g9" in str(results[1])
    assert isinstance(results[2], InvalidRequest) and "reported twice" in str(results[2])
    with engine.connect() as conn:
        assert set(conn.scalars(select(Host.guid))) == {"g1", "g4"}
