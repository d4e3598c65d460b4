"""Command handlers on simulated hosts: every path, every rollback, redelivery."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from hostdev.agent.errors import HypervisorError
from hostdev.agent.handlers import CommandHandlers, Timeouts
from hostdev.agent.simulated import SimulatedHost
from hostdev.messages.base import PowerState
from hostdev.messages.commands import (
    AttachPciDevicesCommand,
    DetachPciDevicesCommand,
    MigrateCommand,
    ResetPciDevicesCommand,
    StartCommand,
    StopCommand,
)
from hostdev.messages.pci_address import PciAddress as P
from hostdev.messages.values import DomainInfo, VmSpec
from tests.support.agent import VM_IDLE_UUID, VM_OLD_UUID, HostFactory

pytestmark = pytest.mark.libvirt

UUID = "33333333-aaaa-bbbb-cccc-000000000001"
NIC1, NIC2, GPU = P("28:00.1"), P("28:00.2"), P("3b:00.0")
INVENTORY = {NIC1: "10GE", NIC2: "10GE", GPU: "GPU"}


def handlers_for(host: SimulatedHost) -> CommandHandlers:
    return CommandHandlers(host, INVENTORY, Timeouts(attach_s=1, detach_s=1, migration_s=5))


def start(*devices: P, uuid: str = UUID, name: str = "vm1") -> StartCommand:
    return StartCommand(vm=VmSpec(uuid=uuid, name=name, cpus=1, memory_mb=256,
                                  pci_devices=devices))


def migrate(destination: SimulatedHost, detach_s: float = 0.05) -> MigrateCommand:
    return MigrateCommand(vm_uuid=UUID, destination_guid="b", destination_uri=destination.uri,
                          detach_timeout_s=detach_s)


@pytest.fixture
def host(make_host: HostFactory) -> SimulatedHost:
    return make_host("sim-a")


# -- StartCommand ---------------------------------------------------------------


def test_start_defines_and_runs_the_domain_with_its_hostdevs(host: SimulatedHost) -> None:
    """A StartCommand gives a running domain holding exactly the requested devices."""
    handlers = handlers_for(host)
    answer = handlers.start(start(NIC1, NIC2))
    assert answer.ok, answer.details
    assert answer.hostdevs == (NIC1, NIC2)
    info = host.domain(UUID)
    assert info is not None and info.state == "running" and info.hostdevs == (NIC1, NIC2)


def test_a_redelivered_start_succeeds_without_touching_the_domain(host: SimulatedHost) -> None:
    """Starting a domain already running with its devices answers ok again."""
    handlers = handlers_for(host)
    handlers.start(start(NIC1))
    again = handlers.start(start(NIC1))
    assert again.ok and again.details == "already running with its devices"
    assert again.hostdevs == (NIC1,)


def test_start_of_a_running_domain_missing_a_device_plugs_it(host: SimulatedHost) -> None:
    """A running domain short of a requested device gets it attached."""
    handlers = handlers_for(host)
    handlers.start(start(NIC1))
    answer = handlers.start(start(NIC1, NIC2))
    assert answer.ok and answer.hostdevs == (NIC1, NIC2)


def test_start_of_a_stopped_domain_redefines_it_with_the_spec(host: SimulatedHost) -> None:
    """A defined, shut-off domain is redefined with the spec's devices and started."""
    handlers = handlers_for(host)
    answer = handlers.start(start(NIC2, uuid=VM_IDLE_UUID, name="vm-idle"))
    assert answer.ok and answer.hostdevs == (NIC2,)
    assert host.domain(VM_IDLE_UUID).state == "running"  # type: ignore[union-attr]


def test_start_refuses_a_device_not_in_the_inventory(host: SimulatedHost) -> None:
    """A device that pci.devices does not list is refused by address; nothing is defined."""
    handlers = handlers_for(host)
    answer = handlers.start(start(NIC1, P("3b:00.1")))
    assert not answer.ok
    assert "0000:3b:00.1 is not a passthrough device of this host" in answer.details
    assert host.domain(UUID) is None


def test_start_refuses_a_device_held_by_another_running_domain(host: SimulatedHost) -> None:
    """The GPU that vm-old holds is refused naming vm-old; nothing is defined."""
    handlers = handlers_for(host)
    answer = handlers.start(start(GPU))
    assert not answer.ok
    assert f"0000:3b:00.0 is held by domain vm-old ({VM_OLD_UUID}), which is running" \
        in answer.details
    assert host.domain(UUID) is None


def test_start_reads_the_domains_once_for_all_its_devices(host: SimulatedHost,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder check lists libvirt's domains once per command, not once per device.

    Every refusal is still named, in the order of the request.
    """
    listed = []
    read = host.domains

    def counted() -> tuple[DomainInfo, ...]:
        listed.append(1)
        return read()

    monkeypatch.setattr(host, "domains", counted)
    answer = handlers_for(host).start(start(GPU, NIC1, P("3b:00.1")))
    assert not answer.ok and len(listed) == 1
    assert answer.details.index("0000:3b:00.0 is held by domain vm-old") \
        < answer.details.index("0000:3b:00.1 is not a passthrough device")
    assert "0000:28:00.1 is" not in answer.details  # free and listed: no refusal
    assert handlers_for(host).start(start(NIC1, NIC2)).ok and len(listed) == 2


def test_a_device_in_a_shut_off_domain_can_be_started_elsewhere(host: SimulatedHost) -> None:
    """Only a running holder blocks a device: a stopped domain's config does not."""
    handlers = handlers_for(host)
    host.destroy(VM_OLD_UUID)
    assert handlers.start(start(GPU)).ok


def test_a_libvirt_failure_on_start_is_answered(host: SimulatedHost) -> None:
    """A name clash with another domain is answered as an error with libvirt's reason."""
    handlers = handlers_for(host)
    answer = handlers.start(start(NIC1, name="vm-old"))
    assert not answer.ok and "define failed" in answer.details


# -- StopCommand ----------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True])
def test_stop_powers_the_domain_off_and_is_idempotent(host: SimulatedHost, force: bool) -> None:
    """Graceful or forced, the domain ends stopped; a second stop answers ok too."""
    handlers = handlers_for(host)
    handlers.start(start(NIC1))
    for _ in range(2):
        answer = handlers.stop(StopCommand(vm_uuid=UUID, force=force, timeout_s=2))
        assert answer.ok and answer.state == "stopped"
    assert host.domain(UUID).state == "stopped"  # type: ignore[union-attr]


def test_stop_with_undefine_removes_the_domain(host: SimulatedHost) -> None:
    """undefine=true leaves no definition; stopping an absent domain is ok."""
    handlers = handlers_for(host)
    handlers.start(start(NIC1))
    assert handlers.stop(StopCommand(vm_uuid=UUID, undefine=True)).ok
    assert host.domain(UUID) is None
    again = handlers.stop(StopCommand(vm_uuid=UUID, undefine=True))
    assert again.ok and again.state == "stopped"


class StubbornGuest(SimulatedHost):
    """A guest that ignores the ACPI power button."""

    def shutdown(self, uuid: str, timeout_s: float) -> PowerState:
        return "running"


def test_a_guest_ignoring_shutdown_gets_an_error_suggesting_force(
        make_host: HostFactory) -> None:
    """A graceful stop that times out answers error and tells to use force."""
    host = make_host("sim-a")
    stubborn = StubbornGuest(host.uri)
    stubborn._conn = host._conn  # share the open connection
    handlers = handlers_for(stubborn)
    handlers.start(start(NIC1))
    answer = handlers.stop(StopCommand(vm_uuid=UUID, timeout_s=0.1))
    assert not answer.ok and answer.state == "running"
    assert "force=true" in answer.details


# -- MigrateCommand -------------------------------------------------------------


def test_migrate_detaches_every_device_then_moves_the_domain(make_host: HostFactory) -> None:
    """Success: all hostdevs detached, the domain runs on the destination without them."""
    source, destination = make_host("sim-a"), make_host("sim-b")
    handlers = handlers_for(source)
    handlers.start(start(NIC1, NIC2))
    answer = handlers.migrate(migrate(destination))
    assert answer.ok, answer.details
    assert answer.detached == (NIC1, NIC2) and answer.reattached == ()
    assert source.domain(UUID) is None
    assert destination.domain(UUID).hostdevs == ()  # type: ignore[union-attr]
    again = handlers.migrate(migrate(destination))
    assert again.ok and "already migrated" in again.details


def test_migrate_binds_the_memory_to_the_commanded_node_on_the_destination(
        make_host: HostFactory) -> None:
    """A guest bound to node 0 arrives bound to the node the command names; None keeps it."""
    source, destination = make_host("sim-a"), make_host("sim-b")
    handlers = handlers_for(source)
    handlers.start(StartCommand(vm=VmSpec(uuid=UUID, name="vm1", cpus=1, memory_mb=256,
                                          pci_devices=(NIC1,), numa_node=0)))
    command = MigrateCommand(vm_uuid=UUID, destination_guid="b", numa_node=1,
                             destination_uri=destination.uri, detach_timeout_s=0.05)
    assert handlers.migrate(command).ok
    assert _nodesets(destination.domain_xml(UUID)) == ["1"]
    handlers_for(destination).migrate(migrate(source))
    assert _nodesets(source.domain_xml(UUID)) == ["1"]


def _nodesets(xml: str) -> list[str | None]:
    return [m.get("nodeset") for m in ET.fromstring(xml).findall("./numatune/memory")]


def test_a_refused_detach_reattaches_the_others_and_cancels(make_host: HostFactory) -> None:
    """Device 1 detached, device 2 refused: device 1 is put back, the VM stays untouched."""
    source = make_host("sim-a", refuse_detach=["28:00.2"])
    destination = make_host("sim-b")
    handlers = handlers_for(source)
    handlers.start(start(NIC1, NIC2))
    answer = handlers.migrate(migrate(destination))
    assert not answer.ok and answer.failed_step == "detach"
    assert answer.refused_device == NIC2
    assert answer.detached == (NIC1,) and answer.reattached == (NIC1,)
    assert "0000:28:00.2 refused to release" in answer.details
    info = source.domain(UUID)
    assert info is not None and info.state == "running" and set(info.hostdevs) == {NIC1, NIC2}
    assert destination.domain(UUID) is None


def test_a_refusal_of_the_first_device_detaches_nothing(make_host: HostFactory) -> None:
    """When the first device refuses, nothing was detached and nothing re-attached."""
    source = make_host("sim-a", refuse_detach=["28:00.1"])
    handlers = handlers_for(source)
    handlers.start(start(NIC1, NIC2))
    answer = handlers.migrate(migrate(make_host("sim-b")))
    assert (answer.refused_device, answer.detached, answer.reattached) == (NIC1, (), ())
    assert source.domain(UUID).hostdevs == (NIC1, NIC2)  # type: ignore[union-attr]


def test_a_failed_migration_reattaches_every_device_on_the_source(
        make_host: HostFactory) -> None:
    """Migration failure: all detached devices are re-attached, the VM runs on the source."""
    source = make_host("sim-a", fail_migration="connection to destination refused")
    destination = make_host("sim-b")
    handlers = handlers_for(source)
    handlers.start(start(NIC1, NIC2))
    answer = handlers.migrate(migrate(destination))
    assert not answer.ok and answer.failed_step == "migrate"
    assert answer.detached == (NIC1, NIC2)
    assert set(answer.reattached) == {NIC1, NIC2}
    assert "connection to destination refused" in answer.details
    info = source.domain(UUID)
    assert info is not None and info.state == "running" and set(info.hostdevs) == {NIC1, NIC2}


def test_an_error_after_the_hand_over_is_a_done_migration(
        make_host: HostFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Libvirt raising once the domain runs on the destination: nothing re-attached here.

    The shut-off definition the failed call left on the source is removed, so
    no definition holding the devices stays where the VM no longer runs.
    """
    source, destination = make_host("sim-a"), make_host("sim-b")
    handlers = handlers_for(source)
    handlers.start(start(NIC1, NIC2))
    moved = source.migrate

    def fails_at_the_end(uuid: str, uri: str, timeout_s: float, **options: object) -> None:
        left = source.domain_xml(uuid, inactive=True)
        moved(uuid, uri, timeout_s, **options)  # type: ignore[arg-type]
        source.define_xml(left)  # what an unconfirmed UNDEFINE_SOURCE leaves
        raise HypervisorError("migrate", "connection reset in the confirm phase")

    monkeypatch.setattr(source, "migrate", fails_at_the_end)
    answer = handlers.migrate(migrate(destination))
    assert answer.ok, answer.details
    assert answer.detached == (NIC1, NIC2) and answer.reattached == ()
    assert source.domain(UUID) is None
    arrived = destination.domain(UUID)
    assert arrived is not None and arrived.state == "running" and arrived.hostdevs == ()


class BrokenReattach(SimulatedHost):
    """A host whose re-attach of one device fails."""

    def attach_hostdev(self, uuid: str, address: P, timeout_s: float) -> None:
        if address == NIC1:
            raise HypervisorError("attach", "simulated attach failure")
        super().attach_hostdev(uuid, address, timeout_s)


def test_a_failed_reattach_is_reported_and_not_listed(make_host: HostFactory) -> None:
    """A re-attach that fails during rollback is named in details, absent from reattached."""
    opened = make_host("sim-a", fail_migration="boom")
    source = BrokenReattach(opened.uri)
    source._conn, source._refused = opened._conn, set()
    source.fail_migrations("boom")
    handlers = handlers_for(source)
    handlers.start(start(NIC1, NIC2))
    answer = handlers.migrate(migrate(make_host("sim-b")))
    assert answer.reattached == (NIC2,)
    assert "re-attaching 0000:28:00.1 failed" in answer.details


def test_migrate_of_an_unknown_or_stopped_domain_is_an_error(make_host: HostFactory) -> None:
    """A domain not here (and not at the destination) or not running is refused."""
    source, destination = make_host("sim-a"), make_host("sim-b")
    handlers = handlers_for(source)
    missing = handlers.migrate(migrate(destination))
    assert not missing.ok and "is not on this host" in missing.details
    stopped = handlers.migrate(MigrateCommand(vm_uuid=VM_IDLE_UUID, destination_guid="b",
                                              destination_uri=destination.uri))
    assert not stopped.ok and "only a running domain migrates" in stopped.details


# -- Attach/DetachPciDevicesCommand -----------------------------------------------


def test_attach_gives_one_result_per_device(host: SimulatedHost) -> None:
    """Attached, already attached, not listed, and held elsewhere each get their outcome."""
    handlers = handlers_for(host)
    handlers.start(start(NIC1))
    answer = handlers.attach(AttachPciDevicesCommand(
        vm_uuid=UUID, addresses=(NIC1, NIC2, P("3b:00.1"), GPU)))
    outcomes = {o.address: (o.result, o.details) for o in answer.devices}
    assert outcomes[NIC1] == ("ok", "already attached")
    assert outcomes[NIC2] == ("ok", "")
    assert outcomes[P("3b:00.1")][0] == "error"
    assert "held by domain vm-old" in outcomes[GPU][1]
    assert not answer.ok and "could not attach 0000:3b:00.1, 0000:3b:00.0" in answer.details
    assert host.domain(UUID).hostdevs == (NIC1, NIC2)  # type: ignore[union-attr]
    again = handlers.attach(AttachPciDevicesCommand(vm_uuid=UUID, addresses=(NIC1, NIC2)))
    assert again.ok


def test_attach_to_an_absent_domain_fails_every_device(host: SimulatedHost) -> None:
    """Without the domain, each device is an error naming the VM."""
    answer = handlers_for(host).attach(AttachPciDevicesCommand(vm_uuid=UUID, addresses=(NIC1,)))
    assert not answer.ok and answer.devices[0].result == "error"


def test_detach_gives_one_result_per_device(make_host: HostFactory) -> None:
    """Detached, already detached, and refused each get their outcome."""
    host = make_host("sim-a", refuse_detach=["28:00.2"])
    handlers = handlers_for(host)
    handlers.start(start(NIC1, NIC2))
    answer = handlers.detach(DetachPciDevicesCommand(
        vm_uuid=UUID, addresses=(NIC1, NIC2, GPU), timeout_s=0.05))
    outcomes = {o.address: (o.result, o.details) for o in answer.devices}
    assert outcomes[NIC1] == ("ok", "")
    assert outcomes[NIC2][0] == "error" and "did not release" in outcomes[NIC2][1]
    assert outcomes[GPU] == ("ok", "not attached")
    assert not answer.ok
    assert host.domain(UUID).hostdevs == (NIC2,)  # type: ignore[union-attr]


def test_detach_from_an_absent_domain_succeeds(host: SimulatedHost) -> None:
    """No domain holds the device, so it is detached: success."""
    answer = handlers_for(host).detach(DetachPciDevicesCommand(vm_uuid=UUID, addresses=(NIC1,)))
    assert answer.ok and answer.devices[0].details == "not attached"


# -- ResetPciDevicesCommand -------------------------------------------------------


def test_reset_resets_listed_free_devices_and_refuses_held_or_unlisted_ones(
        host: SimulatedHost) -> None:
    """Each device gets its outcome: reset, held by a running domain, not listed, failed."""
    handlers = handlers_for(host)
    host.fail_resets([NIC2])
    answer = handlers.reset(ResetPciDevicesCommand(addresses=(NIC1, NIC2, GPU, P("5e:00.0"))))
    outcomes = {o.address: (o.result, o.details) for o in answer.devices}
    assert answer.result == "error" and outcomes[NIC1] == ("ok", "")
    assert outcomes[NIC2] == ("error", "reset failed: simulated failure resetting "
                                       "0000:28:00.2 (fail_reset)")
    assert outcomes[GPU][0] == "error" and "held by domain vm-old" in outcomes[GPU][1]
    assert outcomes[P("5e:00.0")][0] == "error"
    assert "not a passthrough device of this host" in outcomes[P("5e:00.0")][1]
    assert host.resets == {NIC1: 1}
