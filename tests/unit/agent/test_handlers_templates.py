"""Starting VMs from rendered templates on simulated hosts: networks, volumes, refusals."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from hostdev.agent.domain_xml import hostdev_xml
from hostdev.agent.handlers import CommandHandlers, Timeouts
from hostdev.agent.simulated import SimulatedHost
from hostdev.messages.commands import MigrateCommand, StartCommand, StopCommand
from hostdev.messages.domain_template import console_path_for, render_domain
from hostdev.messages.pci_address import PciAddress as P
from hostdev.messages.values import VmSpec
from tests.support.agent import TEMPLATE_RESOURCES, HostFactory, example_template

pytestmark = pytest.mark.libvirt

BOND = example_template("debian-bond.xml")
KERNEL = example_template("kernel-boot.xml")
UUID = "55555555-aaaa-bbbb-cccc-000000000001"
OWN = f"{UUID}-vda.qcow2"
NIC1, NIC2 = P("28:00.1"), P("28:00.2")
SPEC = VmSpec(uuid=UUID, name="web1", cpus=2, memory_mb=512, pci_devices=(NIC1,))
#: What the example templates need from a host.
RESOURCES = TEMPLATE_RESOURCES


def handlers_for(host: SimulatedHost) -> CommandHandlers:
    return CommandHandlers(host, {NIC1: "10GE", NIC2: "10GE"},
                           Timeouts(attach_s=1, detach_s=1, migration_s=5))


def start(template: str = BOND, spec: VmSpec = SPEC) -> StartCommand:
    return StartCommand(vm=spec, domain_xml=render_domain(
        template, spec, console_path=console_path_for(template, spec.uuid)))


@pytest.fixture
def host(make_host: HostFactory) -> SimulatedHost:
    return make_host("sim-t", **RESOURCES)


def _nothing_left(host: SimulatedHost) -> None:
    assert host.domain(UUID) is None
    assert host.volumes("images") == ("debian-12.qcow2",)


def test_a_template_vm_runs_on_its_own_volume(host: SimulatedHost) -> None:
    """The VM runs with its device; its disk is a new overlay named after its uuid."""
    answer = handlers_for(host).start(start())
    assert answer.ok, answer.details
    assert answer.hostdevs == (NIC1,)
    assert set(host.volumes("images") or ()) == {"debian-12.qcow2", OWN}
    root = ET.fromstring(host.domain_xml(UUID, inactive=True))
    assert root.get("type") == "test"
    assert root.find("./devices/disk/source").get("volume") == OWN  # type: ignore[union-attr]
    assert [i.get("type") for i in root.findall("./devices/interface")] == ["network", "bridge"]


def test_a_kernel_boot_template_keeps_kernel_initrd_and_console(host: SimulatedHost) -> None:
    """The kernel, initrd and the VM's console file are in the defined domain."""
    answer = handlers_for(host).start(start(KERNEL))
    assert answer.ok, answer.details
    root = ET.fromstring(host.domain_xml(UUID, inactive=True))
    assert root.findtext("./os/kernel") == "/var/lib/hostdev/guest/vmlinuz"
    assert root.findtext("./os/initrd") == "/var/lib/hostdev/guest/initrd.img"
    assert root.find("./devices/serial/source").get("path") == (  # type: ignore[union-attr]
        f"/var/log/libvirt/qemu/{UUID}.console.log")


MISSING = [
    ("network", {**RESOURCES, "networks": []},
     "refused to start: libvirt network 'default' does not exist or is not active on this "
     "host (active networks: none)"),
    ("bridge", {**RESOURCES, "bridges": ["br1"]},
     "refused to start: bridge 'br0' does not exist on this host (interfaces: br1)"),
    ("base image", {**RESOURCES, "pools": {"images": ["other.qcow2"]}},
     "refused to start: this host has no base image debian-12.qcow2 in storage pool 'images'"),
    ("pool", {**RESOURCES, "pools": {}},
     "refused to start: this host has no storage pool 'images' (the base image "
     "debian-12.qcow2 lives there)"),
]


@pytest.mark.parametrize(("case", "resources", "details"), MISSING, ids=[m[0] for m in MISSING])
def test_a_host_lacking_what_the_template_names_refuses_it(
        make_host: HostFactory, case: str, resources: dict[str, object], details: str) -> None:
    """The refusal names what is missing; no domain and no volume is left."""
    host = make_host("sim-m", **resources)
    answer = handlers_for(host).start(start())
    assert not answer.ok and answer.details == details
    assert host.domain(UUID) is None
    assert all(OWN not in (host.volumes(p) or ()) for p in ("images",))


def test_a_domain_passing_through_an_unassigned_device_is_refused(host: SimulatedHost) -> None:
    """A hostdev management did not assign is refused, naming it; nothing is made."""
    command = start()
    root = ET.fromstring(command.domain_xml)
    root.find("devices").append(ET.fromstring(hostdev_xml(NIC2)))  # type: ignore[union-attr]
    forged = StartCommand(vm=SPEC, domain_xml=ET.tostring(root, encoding="unicode"))
    answer = handlers_for(host).start(forged)
    assert not answer.ok
    assert answer.details == ("refused to start: the domain XML passes through 0000:28:00.2, "
                              "which management did not assign; only assigned devices are "
                              "passed through")
    _nothing_left(host)


def test_a_domain_for_another_vm_is_refused(host: SimulatedHost) -> None:
    """A domain XML whose uuid is not the spec's is refused."""
    other = VmSpec(uuid="55555555-aaaa-bbbb-cccc-000000000009", name="x", cpus=1,
                   memory_mb=128, pci_devices=(NIC1,))
    command = StartCommand(vm=SPEC, domain_xml=render_domain(BOND, other))
    answer = handlers_for(host).start(command)
    assert not answer.ok and answer.details.startswith(
        "refused to start: the domain XML is for 'x'")
    _nothing_left(host)


def test_a_define_libvirt_refuses_removes_the_new_volume(host: SimulatedHost) -> None:
    """When libvirt refuses the domain, the volume made for it is deleted again."""
    doubled = BOND.replace("    <interface type='network'>",
                           "    <disk type='volume' device='disk'><source pool='images' "
                           "volume='debian-12.qcow2'/><target dev='vda' bus='virtio'/></disk>\n"
                           "    <interface type='network'>")
    answer = handlers_for(host).start(start(doubled))
    assert not answer.ok and "nothing this start created was kept" in answer.details
    _nothing_left(host)


def test_stop_keeps_the_volume_destroy_deletes_it(host: SimulatedHost) -> None:
    """A stopped VM keeps its volume and starts on it again; undefine deletes it."""
    handlers = handlers_for(host)
    handlers.start(start())
    assert handlers.stop(StopCommand(vm_uuid=UUID, force=True)).ok
    assert OWN in (host.volumes("images") or ())
    assert handlers.start(start()).ok
    assert handlers.stop(StopCommand(vm_uuid=UUID, force=True, undefine=True)).ok
    _nothing_left(host)


def _migrate(destination: SimulatedHost) -> MigrateCommand:
    return MigrateCommand(vm_uuid=UUID, destination_guid="b", destination_uri=destination.uri,
                          detach_timeout_s=0.05)


def test_migration_moves_the_own_volume_to_the_destination(make_host: HostFactory) -> None:
    """Non-shared storage: the destination gets the overlay, the source loses it."""
    source, destination = make_host("sim-s", **RESOURCES), make_host("sim-d", **RESOURCES)
    handlers_for(source).start(start())
    answer = handlers_for(source).migrate(_migrate(destination))
    assert answer.ok, answer.details
    assert OWN in (destination.volumes("images") or ())
    assert source.volumes("images") == ("debian-12.qcow2",)
    assert destination.domain(UUID) is not None


def test_migration_to_a_host_without_the_base_is_refused_first(make_host: HostFactory) -> None:
    """The reason names the missing base; the VM stays running with its device."""
    source = make_host("sim-s", **RESOURCES)
    destination = make_host("sim-d", **{**RESOURCES, "pools": {"images": []}})
    handlers_for(source).start(start())
    answer = handlers_for(source).migrate(_migrate(destination))
    assert not answer.ok and answer.failed_step == "migrate"
    assert answer.details == (f"migration refused: storage failed: {destination.uri} has no "
                              "base image "
                              "debian-12.qcow2 in storage pool 'images'; the VM stays here "
                              "with its devices")
    info = source.domain(UUID)
    assert info is not None and info.state == "running" and info.hostdevs == (NIC1,)
    assert destination.volumes("images") == ()


def test_shared_storage_migrates_without_copying(make_host: HostFactory) -> None:
    """With shared='yes' the destination gets no volume of its own and the source keeps it."""
    shared = BOND.replace('shared="no"', 'shared="yes"')
    source, destination = make_host("sim-s", **RESOURCES), make_host("sim-d", **RESOURCES)
    handlers_for(source).start(start(shared))
    answer = handlers_for(source).migrate(_migrate(destination))
    assert answer.ok, answer.details
    assert destination.volumes("images") == ("debian-12.qcow2",)
    assert OWN in (source.volumes("images") or ())


def test_a_persistent_host_keeps_the_own_volume_across_restarts(make_host: HostFactory) -> None:
    """The volume is saved with the domains and is there again after the host reopens."""
    host = make_host("sim-p", persist=True, **RESOURCES)
    handlers_for(host).start(start())
    host.close()
    again = make_host("sim-p", persist=True, **RESOURCES)
    assert OWN in (again.volumes("images") or ())
