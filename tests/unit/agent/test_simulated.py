"""The simulated host: test driver plus hot-plug, refusals and migration."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from hostdev.agent.domain_xml import build_domain_xml, read_hostdevs
from hostdev.agent.errors import DetachRefused, DomainNotFound, HypervisorError, MigrationFailed
from hostdev.agent.hypervisor import LifecycleEvent
from hostdev.agent.libvirt_host import LibvirtHost
from hostdev.agent.simulated import SimulatedHost
from hostdev.messages.pci_address import PciAddress as P
from hostdev.messages.values import VmSpec
from tests.support.agent import NODE_XML_URI, VM_IDLE_UUID, VM_OLD_UUID, HostFactory
from tests.support.waiting import wait_for

pytestmark = pytest.mark.libvirt

UUID = "22222222-aaaa-bbbb-cccc-000000000001"
NIC1, NIC2 = P("28:00.1"), P("28:00.2")


def running_vm(host: SimulatedHost, *devices: P) -> str:
    host.define(build_domain_xml(VmSpec(uuid=UUID, name="vm1", cpus=1, memory_mb=256,
                                        pci_devices=devices)))
    host.start(UUID)
    return UUID


def test_the_host_reports_facts_devices_and_domains(make_host: HostFactory) -> None:
    """Facts, PCI node devices and spec domains come from the generated node XML."""
    host = make_host()
    facts = host.facts()
    assert (facts.cpus, facts.memory_mb, facts.hypervisor) == (16, 65536, "test")
    assert [d.address for d in host.pci_devices()] == [
        P("00:03.1"), NIC1, NIC2, P("3b:00.0"), P("3b:00.1")]
    states = {d.uuid: (d.state, d.hostdevs) for d in host.domains()}
    assert states == {VM_OLD_UUID: ("running", (P("3b:00.0"),)), VM_IDLE_UUID: ("stopped", ())}


def test_attach_and_detach_change_the_live_and_persistent_xml(make_host: HostFactory) -> None:
    """A hot-plugged device shows in the live domain; a detached one is gone."""
    host = make_host()
    uuid = running_vm(host, NIC1)
    host.attach_hostdev(uuid, NIC2, 1.0)
    assert host.domain(uuid).hostdevs == (NIC1, NIC2)  # type: ignore[union-attr]
    host.attach_hostdev(uuid, NIC2, 1.0)  # again: nothing changes
    host.detach_hostdev(uuid, NIC1, 1.0)
    host.detach_hostdev(uuid, NIC1, 1.0)
    info = host.domain(uuid)
    assert info is not None and info.state == "running" and info.hostdevs == (NIC2,)


def test_hot_plug_restarts_stay_invisible_to_lifecycle_listeners(make_host: HostFactory) -> None:
    """The restart that emulates hot-plug emits no lifecycle event to the agent."""
    host = make_host()
    events: list[LifecycleEvent] = []
    host.set_lifecycle_listener(events.append)
    uuid = running_vm(host)
    wait_for(lambda: any(e.event == "Started" for e in events), timeout=5, what="start event")
    host.attach_hostdev(uuid, NIC1, 1.0)
    host.detach_hostdev(uuid, NIC1, 1.0)
    host.destroy(uuid)  # a marker: its event comes after any leaked ones
    wait_for(lambda: any(e.event == "Stopped" for e in events), timeout=5, what="stop event")
    assert [(e.event, e.detail) for e in events] == [
        ("Defined", "Added"), ("Started", "Booted"), ("Stopped", "Destroyed")]


def test_a_refused_detach_times_out_and_leaves_the_device(make_host: HostFactory) -> None:
    """A guest that ignores the unplug keeps the device; the detach raises DetachRefused."""
    host = make_host(refuse_detach=["28:00.2"])
    uuid = running_vm(host, NIC1, NIC2)
    with pytest.raises(DetachRefused) as info:
        host.detach_hostdev(uuid, NIC2, 0.05)
    assert info.value.address == NIC2
    assert "did not release 0000:28:00.2 within 0.05 s" in str(info.value)
    assert host.domain(uuid).hostdevs == (NIC1, NIC2)  # type: ignore[union-attr]
    assert NIC2 in read_hostdevs(host.domain_xml(uuid, inactive=True))
    host.refuse_detach(NIC2, refuse=False)
    host.detach_hostdev(uuid, NIC2, 0.05)
    assert host.domain(uuid).hostdevs == (NIC1,)  # type: ignore[union-attr]


def test_the_test_driver_keeps_a_strict_numa_memory_binding(make_host: HostFactory) -> None:
    """libvirt's test driver defines and starts a domain with numatune and keeps it."""
    host = make_host()
    host.define(build_domain_xml(VmSpec(uuid=UUID, name="vm1", cpus=1, memory_mb=256,
                                        pci_devices=(NIC1,), numa_node=1), domain_type="test"))
    host.start(UUID)
    live = ET.fromstring(host.domain_xml(UUID))
    assert [m.attrib for m in live.findall("./numatune/memory")] == [
        {"mode": "strict", "nodeset": "1"}]


def test_migration_moves_the_domain_between_simulated_hosts(make_host: HostFactory) -> None:
    """The domain leaves the source and runs on the destination with the same XML."""
    source, destination = make_host("sim-a"), make_host("sim-b")
    uuid = running_vm(source, NIC1)
    assert not source.has_domain_at(destination.uri, uuid)
    source.migrate(uuid, destination.uri, 5.0)
    assert source.domain(uuid) is None
    moved = destination.domain(uuid)
    assert moved is not None and moved.state == "running" and moved.hostdevs == (NIC1,)
    assert source.has_domain_at(destination.uri, uuid)


@pytest.mark.parametrize(("target", "reason"), [
    ("self", "same host"),
    ("simulated:///nowhere.json", "no simulated host is open at that URI"),
    ("failing", "injected failure"),
])
def test_a_failed_migration_leaves_the_domain_running_on_the_source(
        make_host: HostFactory, target: str, reason: str) -> None:
    """Unknown destination, the same host, or an injected failure raise MigrationFailed."""
    source = make_host("sim-a")
    destination = make_host("sim-b")
    uuid = running_vm(source, NIC1)
    uri = {"self": source.uri, "failing": destination.uri}.get(target, target)
    if target == "failing":
        source.fail_migrations("injected failure")
    with pytest.raises(MigrationFailed, match=reason):
        source.migrate(uuid, uri, 5.0)
    assert source.domain(uuid).state == "running"  # type: ignore[union-attr]
    assert destination.domain(uuid) is None


def test_an_unknown_domain_is_domain_not_found(make_host: HostFactory) -> None:
    """Operations on a UUID the host does not have raise DomainNotFound; domain() is None."""
    host = make_host()
    assert host.domain(UUID) is None
    with pytest.raises(DomainNotFound):
        host.start(UUID)
    host.undefine(UUID)  # absent is fine


def test_two_hosts_keep_separate_state(make_host: HostFactory) -> None:
    """Each simulated host has its own connection and domains."""
    a, b = make_host("sim-a"), make_host("sim-b")
    running_vm(a)
    assert a.domain(UUID) is not None and b.domain(UUID) is None


def test_a_test_uri_opens_a_node_file_as_is() -> None:
    """test:///<node.xml> serves the reference file's devices and domains."""
    host = SimulatedHost(NODE_XML_URI)
    host.open()
    try:
        assert P("28:00.1") in {d.address for d in host.pci_devices()}
        assert {d.name for d in host.domains()} == {"vm-gpu", "vm-idle"}
    finally:
        host.close()


def test_plain_libvirt_errors_become_hypervisor_errors_with_the_code() -> None:
    """On the bare test driver a live attach is unsupported: HypervisorError, libvirt code 3."""
    host = LibvirtHost(NODE_XML_URI)
    host.open()
    try:
        with pytest.raises(HypervisorError) as info:
            host.attach_hostdev("11111111-aaaa-bbbb-cccc-000000000001", P("28:00.1"), 1.0)
        assert info.value.code == 3 and info.value.operation == "attach"
        assert "not supported" in str(info.value)
    finally:
        host.close()
    with pytest.raises(HypervisorError, match="not open"):
        host.domains()


def test_a_migration_reports_migrated_events_like_libvirt(make_host: HostFactory) -> None:
    """Source: Stopped/Migrated then Undefined; destination: Started/Migrated, no boot."""
    source, destination = make_host("sim-a"), make_host("sim-b")
    on_source: list[LifecycleEvent] = []
    on_destination: list[LifecycleEvent] = []
    source.set_lifecycle_listener(on_source.append)
    destination.set_lifecycle_listener(on_destination.append)
    uuid = running_vm(source, NIC1)
    wait_for(lambda: any(e.event == "Started" for e in on_source), timeout=5,
             what="the boot on the source")
    source.migrate(uuid, destination.uri, 5.0)
    wait_for(lambda: any(e.event == "Undefined" for e in on_source), timeout=5,
             what="the source's Undefined event")
    wait_for(lambda: any(e.event == "Defined" for e in on_destination), timeout=5,
             what="the destination's Defined event")
    source_events = [(e.event, e.detail) for e in on_source if e.uuid == uuid]
    assert source_events[-2:] == [("Stopped", "Migrated"), ("Undefined", "Removed")]
    assert ("Stopped", "Destroyed") not in source_events
    destination_events = {(e.event, e.detail) for e in on_destination}
    assert ("Started", "Migrated") in destination_events
    assert ("Started", "Booted") not in destination_events


def test_the_test_driver_keeps_numa_sriov_and_driver_facts(make_host: HostFactory) -> None:
    """libvirt's test driver gives back the NUMA node, PF/VF relation and driver of a spec."""
    host = make_host(devices=[
        {"address": "5e:00.0", "iommu_group": 60, "numa_node": 1, "driver": "i40e"},
        {"address": "5e:02.0", "iommu_group": 61, "numa_node": 0, "driver": "vfio-pci",
         "physical_function": "5e:00.0"},
    ], domains=[])
    devices = {d.address: d for d in host.pci_devices()}
    pf, vf = devices[P("5e:00.0")], devices[P("5e:02.0")]
    assert (pf.numa_node, pf.driver, pf.virtual_functions) == (1, "i40e", (P("5e:02.0"),))
    assert (vf.numa_node, vf.driver, vf.physical_function) == (0, "vfio-pci", P("5e:00.0"))
    assert (vf.iommu_group, vf.iommu_members) == (61, (P("5e:02.0"),))
