"""Tests of first-fit placement: the pure verdicts and refusals, and the search on SQLite."""

from __future__ import annotations

import uuid

from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from hostdev.messages.values import PciRequest
from hostdev.mgmt.persistence.models import Host, PciDevice
from hostdev.mgmt.placement import blocks, planner, search
from hostdev.mgmt.placement.planner import Demand, HostCapacity, find_hosts, refusal, verdict
from tests.support.databases import raise_blocks

TWO_10GE = Demand(cpus=2, memory_mb=1024, pci=(PciRequest(name="10GE", count=2),))


def _cap(name: str, status: str = "Up", free: int = 0, cpus: int = 8) -> HostCapacity:
    return HostCapacity(id=1, guid=f"g-{name}", name=name, status=status, free_cpus=cpus,
                        free_memory_mb=4096, free_devices={"10GE": free})


def test_verdict_lists_every_reason() -> None:
    """A rejected host gets every reason: status, CPUs, devices."""
    result = verdict(_cap("h1", status="Down", free=1, cpus=1), TWO_10GE)
    assert not result.accepted
    assert result.reason == "is Down; needs 2 CPUs, 1 free; needs 2x10GE, 1 free"
    assert verdict(_cap("h2", free=2), TWO_10GE).reason == "fits"


def test_refusal_reads_like_the_issue() -> None:
    """The refusal names each host's count or status."""
    hosts = [_cap("h1", free=1), _cap("h2", status="Down", free=2), _cap("h3")]
    assert refusal(TWO_10GE, hosts) == ("no host has 2 x 10GE free: h1 has 1, h2 is Down, "
                                        "h3 has 0")


def test_verdict_and_refusal_say_which_rule_keeps_devices() -> None:
    """Devices a hardware rule keeps are counted and their reason quoted, most common first."""
    kept = planner.Unavailable(2, ("IOMMU group 40: 0000:28:00.0 is held by VM vm-a",))
    host = HostCapacity(id=1, guid="g-h1", name="h1", status="Up", free_cpus=8,
                        free_memory_mb=4096, free_devices={"10GE": 1},
                        unavailable={"10GE": kept})
    assert verdict(host, TWO_10GE).reason == (
        "needs 2x10GE, 1 free (2 unavailable: IOMMU group 40: 0000:28:00.0 is held by VM vm-a)")
    assert refusal(TWO_10GE, [host]) == (
        "no host has 2 x 10GE free: h1 has 1 (2 unavailable: IOMMU group 40: 0000:28:00.0 "
        "is held by VM vm-a)")
    many = planner.Unavailable(5, ("a", "b", "c"))
    assert str(many) == "5 unavailable: a; b; ..."


def test_refusal_without_hosts_says_to_start_an_agent() -> None:
    """With no host registered, the refusal says what to do."""
    assert "start a hostdev-agent" in refusal(TWO_10GE, [])



def _hosts(engine: Engine, specs: list[tuple[str, str, int]]) -> None:
    """Inserts hosts (name, status, free 10GE count) in order."""
    with engine.begin() as conn:
        for name, status, free in specs:
            host_id = conn.execute(insert(Host).values(
                guid=str(uuid.uuid4()), name=name, status=status, cpus=8, memory_mb=8192,
                hypervisor_version="")).inserted_primary_key[0]
            for n in range(free):
                conn.execute(insert(PciDevice).values(
                    host_id=host_id, name="10GE", domain="0000", bus="28", slot="00",
                    function=str(n), state="free"))
        raise_blocks(conn)  # as the hosts' registrations would


def test_search_is_first_fit_and_skips_what_does_not_fit(engine: Engine) -> None:
    """The first Up host with two free 10GE wins; Down and short hosts are skipped."""
    _hosts(engine, [("h1", "Up", 1), ("h2", "Down", 4), ("h3", "Up", 2), ("h4", "Up", 3)])
    with Session(engine) as session:
        assert [c.name for c in find_hosts(session, TWO_10GE)] == ["h3", "h4"]
        assert [c.name for c in find_hosts(session, TWO_10GE, avoid={"h3"})] == ["h4"]


def test_search_reads_the_next_page_when_a_page_is_refused(engine: Engine) -> None:
    """More Down hosts than a page hold free devices: the search still finds the Up one."""
    specs = [(f"d{n}", "Down", 2) for n in range(planner.PAGE + 3)] + [("up", "Up", 2)]
    _hosts(engine, specs)
    with Session(engine) as session:
        assert [c.name for c in find_hosts(session, TWO_10GE)] == ["up"]
        assert find_hosts(session, TWO_10GE, avoid={"up"}) == []


def test_search_takes_turns_past_refused_pages_and_full_blocks(engine: Engine) -> None:
    """A refused page, the blocks of one host search of full hosts, another refused page, more
    than those blocks of full hosts: the first host that fits is still found, and nothing
    before it."""
    window = search.BLOCKS * blocks.BLOCK
    specs = ([(f"d{n}", "Down", 2) for n in range(planner.PAGE + 1)]
             + [(f"f{n}", "Up", 0) for n in range(window)]
             + [(f"m{n}", "Maintenance", 2) for n in range(planner.PAGE + 1)]
             + [(f"g{n}", "Up", 1) for n in range(window + 1)]
             + [("up", "Up", 2), ("up2", "Up", 3)])
    _hosts(engine, specs)
    with Session(engine) as session:
        assert [c.name for c in find_hosts(session, TWO_10GE)] == ["up", "up2"]
        assert [c.name for c in find_hosts(session, TWO_10GE, avoid={"up"})] == ["up2"]
        assert find_hosts(session, TWO_10GE, avoid={"up", "up2"}) == []


def test_search_checks_every_requested_name_and_avoids_by_guid(engine: Engine) -> None:
    """A second requested name is counted per host; a guid in the avoid set leaves the host out."""
    _hosts(engine, [("h1", "Up", 2), ("h2", "Up", 2), ("h3", "Up", 2)])
    with engine.begin() as conn:
        for host_id in (2, 3):
            conn.execute(insert(PciDevice).values(
                host_id=host_id, name="GPU", domain="0000", bus="29", slot="00",
                function="0", state="free"))
        guid_h2 = conn.execute(select(Host.guid).where(Host.name == "h2")).scalar_one()
    both = Demand(cpus=2, memory_mb=1024, pci=(PciRequest(name="10GE", count=2),
                                               PciRequest(name="GPU", count=1)))
    with Session(engine) as session:
        assert [c.name for c in find_hosts(session, both)] == ["h2", "h3"]
        assert [c.name for c in find_hosts(session, both, avoid={guid_h2, "h9"})] == ["h3"]
        assert [c.name for c in find_hosts(session, both, limit=1)] == ["h2"]
