"""A deploy that the hardware rules refuse on every host fitting by count, on MariaDB and SQLite.

Placement counts free devices; the claim then follows the rules (an IOMMU
group whole to one VM, a PF never with its own VFs). A host whose free
devices meet a request only as a PF together with its VF is found by the
search and refused by the claim. That refusal is final (the host's claims
are serialized and read all its rows), so the deploy must go on to the hosts
after it and, when none is left, be refused at once as ``no_capacity``
naming why: not retried as if it had lost a race, nor reported as a
contended database.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from hostdev.messages import api
from hostdev.messages.commands import ErrorAnswer
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import PciDeviceInfo
from hostdev.mgmt.persistence.models import Host, VmInstance
from tests.support.databases import migrated_engine
from tests.support.mgmt_harness import Harness, devices


@pytest.fixture(params=[pytest.param("mariadb", marks=pytest.mark.mariadb), "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated database: MariaDB or an SQLite file."""
    with migrated_engine(request.param, tmp_path, "hostdev_rule_refusals") as created:
        yield created


def _pf_and_its_vf() -> tuple[PciDeviceInfo, ...]:
    """A 10GE PF and its one VF, each alone in its IOMMU group: two free by count."""
    pf, vf = PciAddress("28:00.0"), PciAddress("28:10.0")
    return (PciDeviceInfo(address=pf, name="10GE", iommu_group=1, iommu_members=(pf,),
                          virtual_functions=(vf,)),
            PciDeviceInfo(address=vf, name="10GE", iommu_group=2, iommu_members=(vf,),
                          physical_function=pf))


def _harness(engine: Engine, ruled_hosts: int, plain_hosts: int = 0) -> Harness:
    harness = Harness(engine)
    for n in range(ruled_hosts):
        harness.register(f"g{n + 1}", f"h{n + 1}", _pf_and_its_vf())
    for n in range(ruled_hosts, ruled_hosts + plain_hosts):
        harness.register(f"g{n + 1}", f"h{n + 1}", devices(2))
    harness.api(api.CreateOfferingRequest(name="two", pci_devices="10GE:2"))
    return harness


def _placed_on(engine: Engine, name: str) -> str | None:
    with engine.connect() as conn:
        return conn.scalar(select(Host.name).join(VmInstance, VmInstance.host_id == Host.id)
                           .where(VmInstance.name == name))


def test_a_deploy_only_a_pf_with_its_own_vf_could_meet_is_refused_as_no_capacity(
        engine: Engine) -> None:
    """One host, a PF and its VF free, two devices asked: no_capacity saying why; no VM."""
    harness = _harness(engine, ruled_hosts=1)

    answer = harness.api(api.DeployVmRequest(name="v1", offering="two"))

    assert isinstance(answer, ErrorAnswer), answer
    assert answer.code == "no_capacity", answer.details
    assert "h1 has 2 10GE free, but not 2 that one VM may hold together" in answer.details
    assert "PF never with its own VFs" in answer.details
    with engine.connect() as conn:
        assert conn.scalar(select(VmInstance.id)) is None


def test_a_deploy_goes_past_every_host_the_rules_refuse(engine: Engine) -> None:
    """Six such hosts (more than a search returns) before a plain one: placed on the plain one."""
    harness = _harness(engine, ruled_hosts=6, plain_hosts=1)

    answer = harness.api(api.DeployVmRequest(name="v1", offering="two"))

    assert isinstance(answer, api.JobAccepted), answer
    assert _placed_on(engine, "v1") == "h7"
    assert harness.answer() == 1
    with engine.connect() as conn:
        assert conn.scalar(select(VmInstance.state).where(VmInstance.name == "v1")) == "Running"


def test_explain_rejects_the_host_the_rules_refuse_as_a_deploy_would(engine: Engine) -> None:
    """explain: the PF-and-VF host rejected with the claim's reason; a plain host fits."""
    harness = _harness(engine, ruled_hosts=1, plain_hosts=1)

    answer = harness.api(api.ExplainPlacementRequest(offering="two"))

    assert isinstance(answer, api.PlacementExplanation), answer
    verdicts = {v.host_name: v for v in answer.verdicts}
    assert not verdicts["h1"].accepted
    assert verdicts["h1"].reason.startswith("has 2 10GE free, but not 2 that one VM may hold")
    assert verdicts["h2"].accepted and verdicts["h2"].reason == "fits"
