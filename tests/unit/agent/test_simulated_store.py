"""Simulated migration across processes through a host's mailbox, and run-time faults."""

from __future__ import annotations

import fcntl
import os
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hostdev.agent import simulated_store
from hostdev.agent.domain_xml import build_domain_xml
from hostdev.agent.errors import DetachRefused, HypervisorError, MigrationFailed
from hostdev.agent.simulated import SimulatedHost
from hostdev.messages.pci_address import PciAddress as P
from hostdev.messages.values import VmSpec
from tests.support.agent import sample_spec, write_spec
from tests.support.waiting import wait_for

pytestmark = pytest.mark.libvirt

VM = "77777777-aaaa-bbbb-cccc-000000000001"


def _running(host: SimulatedHost, devices: tuple[P, ...] = (P("28:00.1"),)) -> None:
    host.define(build_domain_xml(VmSpec(uuid=VM, name="mover", cpus=1, memory_mb=128,
                                        pci_devices=devices)))
    host.start(VM)


def test_a_domain_handed_over_appears_when_the_destination_opens(tmp_path: Path) -> None:
    """The source hands the domain to a closed host's mailbox; that host runs it at open()."""
    source = SimulatedHost(write_spec(tmp_path, sample_spec("src", domains=[])))
    source.open()
    destination_uri = write_spec(tmp_path, sample_spec("dst", domains=[]))
    destination = SimulatedHost(destination_uri)
    destination.open()
    destination.close()  # like an agent process that is down
    try:
        _running(source, ())
        source.migrate(VM, destination_uri, 5.0)
        assert source.domain(VM) is None
        assert source.has_domain_at(destination_uri, VM)
        destination = SimulatedHost(destination_uri)
        destination.open()
        arrived = destination.domain(VM)
        assert arrived is not None and arrived.state == "running"
        mailbox = simulated_store.mailbox(destination_uri)
        assert mailbox is not None and not (mailbox / f"{VM}.json").exists()
    finally:
        source.close()
        destination.close()


def test_a_handed_over_domain_arrives_bound_to_the_node_asked_for(tmp_path: Path) -> None:
    """Through the mailbox too, a migration with a NUMA node rebinds the guest's memory."""
    source = SimulatedHost(write_spec(tmp_path, sample_spec("src", domains=[])))
    source.open()
    destination_uri = write_spec(tmp_path, sample_spec("dst", domains=[]))
    destination = SimulatedHost(destination_uri)
    destination.open()
    destination.close()  # another process's host: the hand-over goes through its mailbox
    try:
        source.define(build_domain_xml(VmSpec(uuid=VM, name="mover", cpus=1, memory_mb=128,
                                              numa_node=0), domain_type="test"))
        source.start(VM)
        source.migrate(VM, destination_uri, 5.0, numa_node=1)
        destination = SimulatedHost(destination_uri)
        destination.open()
        bound = ET.fromstring(destination.domain_xml(VM)).findall("./numatune/memory")
        assert [m.get("nodeset") for m in bound] == ["1"]
    finally:
        source.close()
        destination.close()


@contextmanager
def _agent_alive_without_watching(uri: str) -> Iterator[Path]:
    """Holds a mailbox's ``.alive`` lock as a running agent does, taking nothing in."""
    host = SimulatedHost(uri)
    host.open()  # makes the mailbox
    host.close()
    box = simulated_store.mailbox(uri)
    assert box is not None
    fd = os.open(box / simulated_store.ALIVE_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield box
    finally:
        os.close(fd)


def test_a_hand_over_waits_for_a_busy_destination_agent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A destination whose agent runs is waited for past the pick-up wait, as libvirt would."""
    monkeypatch.setattr(simulated_store, "PICKUP_WAIT_S", 0.0)
    source = SimulatedHost(write_spec(tmp_path, sample_spec("src", domains=[])))
    source.open()
    destination_uri = write_spec(tmp_path, sample_spec("dst", domains=[]))
    destination = SimulatedHost(destination_uri)
    failures: list[BaseException] = []

    def migrate() -> None:
        try:
            source.migrate(VM, destination_uri, 30.0)
        except BaseException as exc:  # reported by the test
            failures.append(exc)

    try:
        _running(source, ())
        with _agent_alive_without_watching(destination_uri) as box:
            mover = threading.Thread(target=migrate)
            mover.start()
            wait_for(lambda: (box / f"{VM}.json").exists(), timeout=5, what="hand-over")
            mover.join(timeout=0.5)
            assert mover.is_alive(), "the source went on while the destination's agent runs"
            assert source.is_active(VM)
            destination.open()  # this agent now takes the domain in
            mover.join(timeout=10)
        assert not mover.is_alive() and failures == []
        arrived = destination.domain(VM)
        assert arrived is not None and arrived.state == "running"
        assert source.domain(VM) is None
    finally:
        source.close()
        destination.close()


def test_a_domain_never_taken_in_stays_on_the_source(tmp_path: Path) -> None:
    """A running destination agent that takes nothing in within the timeout fails the migration."""
    source = SimulatedHost(write_spec(tmp_path, sample_spec("src", domains=[])))
    source.open()
    destination_uri = write_spec(tmp_path, sample_spec("dst", domains=[]))
    try:
        _running(source, ())
        with _agent_alive_without_watching(destination_uri) as box:
            with pytest.raises(MigrationFailed, match=r"did not take the domain in within 0\.3 s"):
                source.migrate(VM, destination_uri, 0.3)
            assert list(box.glob("*.json")) == []
        assert source.is_active(VM)
        assert not source.has_domain_at(destination_uri, VM)
    finally:
        source.close()


def test_faults_file_switches_detach_and_attach_failures(tmp_path: Path) -> None:
    """Writing the faults file makes a detach refused and an attach fail, then not."""
    host = SimulatedHost(write_spec(tmp_path, sample_spec("faulty", domains=[])))
    host.open()
    try:
        _running(host)
        simulated_store.write_faults(host.uri, version=1, refuse_detach=["28:00.1"],
                                     fail_attach=["28:00.2"])
        watcher = host.watcher
        assert watcher is not None
        wait_for(lambda: P("28:00.2") in watcher.fail_attach, timeout=5, what="faults")
        with pytest.raises(DetachRefused):
            host.detach_hostdev(VM, P("28:00.1"), 0.01)
        with pytest.raises(HypervisorError, match="simulated failure attaching"):
            host.attach_hostdev(VM, P("28:00.2"), 1.0)
        simulated_store.write_faults(host.uri, version=2)
        wait_for(lambda: not watcher.fail_attach, timeout=5, what="faults cleared")
        host.attach_hostdev(VM, P("28:00.2"), 1.0)
        host.detach_hostdev(VM, P("28:00.1"), 1.0)
        domain = host.domain(VM)
        assert domain is not None and domain.hostdevs == (P("28:00.2"),)
    finally:
        host.close()
