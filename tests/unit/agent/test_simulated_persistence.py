"""A persistent simulated host keeps its domains across close and reopen (an agent restart)."""

from __future__ import annotations

import json

import pytest

from hostdev.agent.domain_xml import build_domain_xml
from hostdev.agent.simulated import SimulatedHost
from hostdev.agent.simulated_state import state_path
from hostdev.messages.pci_address import PciAddress as P
from hostdev.messages.values import VmSpec
from tests.support.agent import VM_IDLE_UUID, VM_OLD_UUID, HostFactory

pytestmark = pytest.mark.libvirt

UUID = "33333333-aaaa-bbbb-cccc-000000000001"
NIC1, NIC2 = P("28:00.1"), P("28:00.2")


def reopen(host: SimulatedHost) -> SimulatedHost:
    """Closes ``host`` and opens its URI again, as a restarted agent does."""
    host.close()
    again = SimulatedHost(host.uri)
    again.open()
    return again


def states(host: SimulatedHost) -> dict[str, tuple[str, tuple[P, ...]]]:
    return {d.uuid: (d.state, d.hostdevs) for d in host.domains()}


def test_domains_survive_a_reopen_with_state_and_hostdevs(make_host: HostFactory) -> None:
    """A started VM with a hot-plugged device and a stopped spec domain come back as they were."""
    host = make_host("sim-p", persist=True)
    host.define(build_domain_xml(VmSpec(uuid=UUID, name="vm1", cpus=1, memory_mb=256,
                                        pci_devices=(NIC1,))))
    host.start(UUID)
    host.attach_hostdev(UUID, NIC2, 1.0)
    host.destroy(VM_OLD_UUID)
    before = states(host)
    again = reopen(host)
    try:
        assert states(again) == before
        assert before[UUID] == ("running", (NIC1, NIC2))
        assert before[VM_OLD_UUID] == ("stopped", (P("3b:00.0"),))
    finally:
        again.close()


def test_an_undefined_domain_stays_gone(make_host: HostFactory) -> None:
    """The state file is rewritten on undefine, so the spec's domain is not resurrected."""
    host = make_host("sim-q", persist=True)
    host.undefine(VM_IDLE_UUID)
    again = reopen(host)
    try:
        assert VM_IDLE_UUID not in states(again)
        assert VM_OLD_UUID in states(again)
    finally:
        again.close()


def test_the_state_file_sits_next_to_the_spec(make_host: HostFactory) -> None:
    """``<spec>.state.json`` lists each domain's definition and whether it runs."""
    host = make_host("sim-r", persist=True)
    host.destroy(VM_OLD_UUID)
    spec_path = host.uri.removeprefix("simulated://")
    saved = json.loads(state_path(spec_path).read_text())["domains"]
    assert state_path(spec_path).name == "sim-r.state.json"
    assert sorted(entry["running"] for entry in saved) == [False, False]
    assert all(entry["xml"].startswith("<domain") for entry in saved)


def test_without_persist_nothing_is_written_and_the_spec_wins(make_host: HostFactory) -> None:
    """A host without ``persist`` keeps state in memory only: reopening re-reads the spec."""
    host = make_host("sim-s")
    host.destroy(VM_OLD_UUID)
    spec_path = host.uri.removeprefix("simulated://")
    again = reopen(host)
    try:
        assert not state_path(spec_path).exists()
        assert states(again)[VM_OLD_UUID][0] == "running"
    finally:
        again.close()


def test_a_domain_undefined_while_saving_is_left_out(
        make_host: HostFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another thread undefines a domain between listing and reading: the others are saved."""
    host = make_host("sim-u", persist=True)
    listed = host.domains()
    host.undefine(VM_IDLE_UUID)  # a shut-off one: undefined at once
    monkeypatch.setattr(host, "domains", lambda: listed)  # listed before the undefine
    host.save()
    spec_path = host.uri.removeprefix("simulated://")
    saved = json.loads(state_path(spec_path).read_text())["domains"]
    assert len(listed) == 2 and len(saved) == 1
    assert VM_IDLE_UUID not in saved[0]["xml"]
