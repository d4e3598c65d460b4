"""The agent daemon: announcing, pinging, reporting, dispatching, --check and bad configs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from hostdev.agent.config import parse_config
from hostdev.agent.daemon import Agent, main
from hostdev.agent.errors import HypervisorError
from hostdev.agent.hypervisor import LifecycleEvent
from hostdev.agent.simulated import SimulatedHost
from hostdev.agent.startup_checks import check_host
from hostdev.messages.base import Message
from hostdev.messages.bus.contract import Incoming
from hostdev.messages.commands import (
    PingRoutingCommand,
    StartAnswer,
    StartCommand,
    StartupAnswer,
    StartupRoutingCommand,
    VmStateReport,
)
from hostdev.messages.errors import TransientError
from hostdev.messages.pci_address import PciAddress as P
from hostdev.messages.values import VmSpec
from tests.support.agent import SAMPLE_DEVICES, VM_OLD_UUID, HostFactory, write_properties

pytestmark = pytest.mark.libvirt

GUID = "host-guid-1"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() configures logging onto captured streams; undo it after each test."""
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_hostdev", False):
            root.removeHandler(handler)


class RecordingBus:
    """Records what the agent does with the bus; runs queued calls on demand."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Message]] = []
        self.queues: list[str] = []
        self.consumers: dict[str, Mapping[type[Message], Any]] = {}
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.reconnect: list[Callable[[], None]] = []
        self.soon: list[Callable[[], None]] = []
        self.connected = False

    def connect(self) -> None:
        self.connected = True

    def close(self) -> None:
        self.connected = False

    def declare_agent_queue(self, guid: str) -> str:
        self.queues.append(f"hostdev.agent.{guid}")
        return self.queues[-1]

    def send_to_mgmt(self, guid: str, message: Message, *, correlation_id: str | None = None,
                     message_id: str | None = None) -> str:
        self.sent.append((f"mgmt.{guid}.{type(message).__name__}", message))
        return str(len(self.sent))

    def consume(self, queue: str, handlers: Mapping[type[Message], Any]) -> None:
        self.consumers[queue] = handlers

    def call_every(self, interval_s: float, fn: Callable[[], None]) -> None:
        self.timers.append((interval_s, fn))

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        self.soon.append(fn)

    def run(self, *, until: Callable[[], bool] | None = None,
            timeout: float | None = None) -> None:
        while self.soon:
            self.soon.pop(0)()

    def on_reconnect(self, fn: Callable[[], None]) -> None:
        self.reconnect.append(fn)

    def stop(self) -> None:
        pass

    def of_type(self, kind: type[Message]) -> list[Any]:
        return [m for _, m in self.sent if isinstance(m, kind)]


def incoming(message_id: str = "m-1") -> Incoming:
    return Incoming(message_id=message_id, correlation_id=None, reply_to=None, user_id="guest",
                    routing_key=f"agent.{GUID}.StartCommand", redelivered=False)


def started_agent(host: SimulatedHost) -> tuple[Agent, RecordingBus]:
    config = parse_config(f"guid={GUID}\nname=host-a\nping.interval=5s\nlibvirt.uri={host.uri}\n"
                          f"pci.devices={SAMPLE_DEVICES}\n", "a.properties")
    bus = RecordingBus()
    agent = Agent(config, host, bus, check_host(config, host.pci_devices(), host.domains()))
    agent.start()
    return agent, bus


def test_start_connects_declares_consumes_and_announces(make_host: HostFactory) -> None:
    """The agent declares its queue, consumes every command and sends StartupRoutingCommand."""
    host = make_host()
    _agent, bus = started_agent(host)
    assert bus.connected and bus.queues == [f"hostdev.agent.{GUID}"]
    handled = {t.__name__ for t in bus.consumers[f"hostdev.agent.{GUID}"]}
    assert handled == {"StartCommand", "StopCommand", "MigrateCommand", "StartupAnswer",
                       "ErrorAnswer", "AttachPciDevicesCommand", "DetachPciDevicesCommand",
                       "ResetPciDevicesCommand"}
    key, startup = bus.sent[0]
    assert key == f"mgmt.{GUID}.StartupRoutingCommand"
    assert isinstance(startup, StartupRoutingCommand)
    assert (startup.guid, startup.name, startup.cpus, startup.memory_mb) == (
        GUID, "host-a", 16, 65536)
    assert startup.migration_uri == host.uri
    assert [(d.address, d.name, d.vendor_id, d.iommu_group) for d in startup.pci_devices] == [
        (P("28:00.1"), "10GE", "0x8086", 27), (P("28:00.2"), "10GE", "0x8086", 27),
        (P("3b:00.0"), "GPU", "0x10de", 40)]
    old = {d.uuid: d for d in startup.domains}[VM_OLD_UUID]
    assert old.state == "running" and old.hostdevs == (P("3b:00.0"),)


def test_pings_run_every_interval_and_reconnects_reannounce(make_host: HostFactory) -> None:
    """ping.interval schedules PingRoutingCommand; a reconnect sends the start-up again."""
    _agent, bus = started_agent(make_host())
    (ping,) = [fn for interval, fn in bus.timers if interval == 5.0]
    ping()
    (sent,) = bus.of_type(PingRoutingCommand)
    assert sent.guid == GUID and VM_OLD_UUID in {d.uuid for d in sent.domains}
    for callback in bus.reconnect:
        callback()
    assert len(bus.of_type(StartupRoutingCommand)) == 2


def test_lifecycle_events_become_vm_state_reports_on_the_loop_thread(
        make_host: HostFactory) -> None:
    """An event is queued with call_soon_threadsafe and reported with state and hostdevs."""
    host = make_host()
    agent, bus = started_agent(host)
    agent.on_lifecycle(LifecycleEvent(uuid=VM_OLD_UUID, name="vm-old", event="Started",
                                      detail="Booted", state="running"))
    assert bus.of_type(VmStateReport) == []
    bus.run()
    (report,) = bus.of_type(VmStateReport)
    assert (report.vm_uuid, report.state, report.event, report.hostdevs) == (
        VM_OLD_UUID, "running", "Started/Booted", (P("3b:00.0"),))


def _event(uuid: str, event: str, detail: str, state: Any = "running") -> LifecycleEvent:
    return LifecycleEvent(uuid=uuid, name="vm", event=event, detail=detail, state=state)


def fed_agent(host: SimulatedHost) -> tuple[Agent, RecordingBus]:
    """A started agent whose lifecycle events the test feeds (``agent.on_lifecycle``).

    libvirt's own events are not delivered to it: they arrive on libvirt's
    thread at any time, and the tests count reports exactly.
    """
    agent, bus = started_agent(host)
    host.set_lifecycle_listener(None)
    return agent, bus


def test_events_of_one_domain_queued_together_become_one_report(
        make_host: HostFactory) -> None:
    """Several events waiting for the loop give one report, read after the last, named by it."""
    agent, bus = fed_agent(make_host())
    for event, detail in (("Stopped", "Destroyed"), ("Started", "Booted"), ("Resumed", "Unpaused")):
        agent.on_lifecycle(_event(VM_OLD_UUID, event, detail))
    assert len(bus.soon) == 1  # one report queued for the domain, not three
    bus.run()
    (report,) = bus.of_type(VmStateReport)
    assert (report.state, report.event, report.hostdevs) == (
        "running", "Resumed/Unpaused", (P("3b:00.0"),))
    agent.on_lifecycle(_event(VM_OLD_UUID, "Suspended", "Paused", "paused"))
    assert len(bus.soon) == 1  # a later event queues a report again


def _started(host: SimulatedHost, uuid: str, address: P) -> tuple[Agent, RecordingBus, StartAnswer]:
    """Returns a fed agent on ``host``, its bus and its ok answer to starting ``uuid``."""
    agent, bus = fed_agent(host)
    handler = bus.consumers[f"hostdev.agent.{GUID}"][StartCommand]
    answer = handler(StartCommand(vm=VmSpec(uuid=uuid, name="v", cpus=1, memory_mb=128,
                                            pci_devices=(address,))), incoming())
    assert isinstance(answer, StartAnswer) and answer.ok
    return agent, bus, answer


def test_the_report_after_a_start_is_not_sent_and_the_next_change_is(
        make_host: HostFactory) -> None:
    """The start's events would repeat its answer: no report; a destroy after it is reported."""
    host = make_host()
    uuid = "44444444-0000-0000-0000-000000000001"
    agent, bus, answer = _started(host, uuid, P("28:00.1"))
    for event, detail in (("Defined", "Added"), ("Started", "Booted")):
        agent.on_lifecycle(_event(uuid, event, detail))
    bus.run()
    assert bus.of_type(VmStateReport) == []
    host.destroy(uuid)  # behind management's back: a change
    agent.on_lifecycle(_event(uuid, "Stopped", "Destroyed", "stopped"))
    bus.run()
    (report,) = bus.of_type(VmStateReport)
    assert (report.vm_uuid, report.state, report.hostdevs) == (uuid, "stopped", (P("28:00.1"),))
    assert report.seq > answer.seq  # numbered after the answer, as before


def test_a_stop_coalesced_with_a_start_is_reported_though_nothing_changed_since(
        make_host: HostFactory) -> None:
    """Stopped (or Crashed, Undefined) is always reported: the domain left in between."""
    uuid = "44444444-0000-0000-0000-000000000002"
    agent, bus, _ = _started(make_host(), uuid, P("28:00.2"))
    agent.on_lifecycle(_event(uuid, "Stopped", "Migrated", "stopped"))
    agent.on_lifecycle(_event(uuid, "Started", "Migrated"))  # back, same devices
    bus.run()
    (report,) = bus.of_type(VmStateReport)
    assert (report.state, report.event, report.hostdevs) == (
        "running", "Started/Migrated", (P("28:00.2"),))


def test_a_refused_start_leaves_the_next_report_to_be_sent(make_host: HostFactory) -> None:
    """An error answer tells management nothing about the domain: its report is sent."""
    agent, bus = fed_agent(make_host())
    handler = bus.consumers[f"hostdev.agent.{GUID}"][StartCommand]
    answer = handler(StartCommand(vm=VmSpec(uuid=VM_OLD_UUID, name="vm-old", cpus=1,
                                            memory_mb=128, pci_devices=(P("5e:00.0"),))),
                     incoming())
    assert isinstance(answer, StartAnswer) and not answer.ok
    agent.on_lifecycle(_event(VM_OLD_UUID, "Resumed", "Unpaused"))
    bus.run()
    assert [r.state for r in bus.of_type(VmStateReport)] == ["running"]


def test_a_report_repeating_the_last_is_not_sent_a_device_change_or_reconnect_is(
        make_host: HostFactory) -> None:
    """Same state and hostdevs as the last report: skipped, its seq left as a gap.

    A device leaving changes the hostdevs, so it is reported; after a
    reconnect (a new round of announcements) the same state is reported again.
    """
    host = make_host()
    agent, bus = fed_agent(host)
    for _ in range(2):
        agent.on_lifecycle(_event(VM_OLD_UUID, "Resumed", "Unpaused"))
        bus.run()
    (first,) = bus.of_type(VmStateReport)
    host.detach_hostdev(VM_OLD_UUID, P("3b:00.0"), 1.0)
    agent.on_lifecycle(_event(VM_OLD_UUID, "Resumed", "Unpaused"))
    bus.run()
    second = bus.of_type(VmStateReport)[-1]
    assert (second.state, second.hostdevs) == ("running", ())
    assert second.seq > first.seq + 1  # the skipped report took a number
    for callback in bus.reconnect:
        callback()
    agent.on_lifecycle(_event(VM_OLD_UUID, "Resumed", "Unpaused"))
    bus.run()
    assert [(r.state, r.hostdevs) for r in bus.of_type(VmStateReport)] == [
        ("running", (P("3b:00.0"),)), ("running", ()), ("running", ())]


def test_a_domain_gone_is_reported_stopped_each_time(make_host: HostFactory) -> None:
    """Nothing is kept about an undefined domain: its next report is sent too."""
    host = make_host()
    agent, bus = fed_agent(host)
    host.destroy(VM_OLD_UUID)
    host.undefine(VM_OLD_UUID)
    for _ in range(2):
        agent.on_lifecycle(_event(VM_OLD_UUID, "Undefined", "Removed", "stopped"))
        bus.run()
    assert [(r.state, r.hostdevs) for r in bus.of_type(VmStateReport)] == [
        ("stopped", ()), ("stopped", ())]


def test_a_command_is_answered_by_its_handler(make_host: HostFactory) -> None:
    """A StartCommand through the bus handler returns the StartAnswer for the bus to send."""
    _agent, bus = started_agent(make_host())
    handler = bus.consumers[f"hostdev.agent.{GUID}"][StartCommand]
    command = StartCommand(vm=VmSpec(uuid="44444444-0000-0000-0000-000000000001", name="v",
                                     cpus=1, memory_mb=128, pci_devices=(P("28:00.1"),)))
    answer = handler(command, incoming())
    assert isinstance(answer, StartAnswer) and answer.ok and answer.hostdevs == (P("28:00.1"),)
    assert bus.consumers[f"hostdev.agent.{GUID}"][StartupAnswer](
        StartupAnswer(host_id=3), incoming("m-2")) is None


def test_a_hypervisor_failure_in_a_handler_is_transient(make_host: HostFactory) -> None:
    """libvirt failing under a handler raises TransientError so the bus redelivers."""
    host = make_host()
    _agent, bus = started_agent(host)

    def broken(uuid: str) -> None:
        raise HypervisorError("lookup", "connection lost")

    host.domain = broken  # type: ignore[assignment,method-assign]
    handler = bus.consumers[f"hostdev.agent.{GUID}"][StartCommand]
    command = StartCommand(vm=VmSpec(uuid="x", name="v", cpus=1, memory_mb=128))
    with pytest.raises(TransientError, match="connection lost"):
        handler(command, incoming())


def test_a_bad_config_stops_the_agent_before_anything_else(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed address exits 1 with file, line, text and expectation on stderr."""
    path = write_properties(tmp_path, "pci.devices=28:00.9|10GE\n")
    assert main(["--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:1: '28:00.9|10GE': PCI address '28:00.9': function '9'" in err


def test_check_passes_for_a_matching_host(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """--check on a simulated host that has every device exits 0 and says so."""
    from tests.support.agent import sample_spec, write_spec

    uri = write_spec(tmp_path, sample_spec())
    path = write_properties(tmp_path, f"libvirt.uri={uri}\npci.devices={SAMPLE_DEVICES}\n"
                                      "pci.iommu.partial.groups=allow\n")
    assert main(["--config", str(path), "--check"]) == 0
    err = capsys.readouterr().err
    assert "3 of 3 devices found" in err and "test is successful" in err
    assert "shares IOMMU group 40 with 0000:3b:00.1" in err
    assert "is used by domain vm-old" in err
    assert "guid=" not in path.read_text()  # --check changes nothing
    assert "guid not set: the first start writes a generated one" in err


def test_check_prints_the_guid_an_operator_needs_for_the_broker_user(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--check prints the configured guid (the name of the host's broker user)."""
    from tests.support.agent import sample_spec, write_spec

    uri = write_spec(tmp_path, sample_spec())
    path = write_properties(tmp_path, f"guid=h-42\nlibvirt.uri={uri}\n"
                                      f"pci.devices={SAMPLE_DEVICES}\n"
                                      "pci.iommu.partial.groups=allow\n")
    assert main(["--config", str(path), "--check"]) == 0
    assert "hostdev-agent: guid h-42\n" in capsys.readouterr().err


def test_check_fails_for_a_partial_iommu_group(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """--check exits 1 on a group with an unlisted member, naming the line and the way out."""
    from tests.support.agent import sample_spec, write_spec

    uri = write_spec(tmp_path, sample_spec())
    path = write_properties(tmp_path, f"libvirt.uri={uri}\npci.devices={SAMPLE_DEVICES}\n")
    assert main(["--config", str(path), "--check"]) == 1
    err = capsys.readouterr().err
    assert (f"hostdev-agent: error: {path}:2: 0000:3b:00.0 (GPU) is withheld from offer: "
            "IOMMU group 40 also holds 0000:3b:00.1, not in pci.devices; list it or set "
            "pci.iommu.partial.groups=allow\n") in err
    assert "3 of 3 devices found" in err and "test failed" in err


def test_check_fails_for_a_missing_device(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """--check exits 1 naming a listed device the host does not have."""
    from tests.support.agent import sample_spec, write_spec

    uri = write_spec(tmp_path, sample_spec())
    path = write_properties(tmp_path, f"libvirt.uri={uri}\npci.devices=5e:00.0|NVME\n")
    assert main(["--config", str(path), "--check"]) == 1
    err = capsys.readouterr().err
    assert "pci.devices lists 0000:5e:00.0 (NVME)" in err and "test failed" in err


def test_check_fails_when_libvirt_cannot_be_opened(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """An unreachable libvirt URI fails --check with libvirt's reason."""
    path = write_properties(tmp_path, f"libvirt.uri=test://{tmp_path}/missing.xml\n")
    assert main(["--config", str(path), "--check"]) == 1
    assert "cannot open libvirt" in capsys.readouterr().err


def test_libvirt_failures_outside_handlers_are_logged_not_raised(make_host: HostFactory) -> None:
    """A failing announce or state report is skipped; the loop thread survives."""
    host = make_host()
    agent, bus = started_agent(host)

    def broken(*_args: object) -> None:
        raise HypervisorError("lookup", "connection lost")

    host.facts = broken  # type: ignore[assignment,method-assign]
    host.domain = broken  # type: ignore[assignment,method-assign]
    agent.announce()
    agent.on_lifecycle(LifecycleEvent(uuid=VM_OLD_UUID, name="vm-old", event="Stopped",
                                      detail="Destroyed", state="stopped"))
    bus.run()
    assert len(bus.of_type(StartupRoutingCommand)) == 1
    assert bus.of_type(VmStateReport) == []


def test_main_writes_a_guid_and_logs_warnings_before_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """First start: the guid is generated into the file; an unknown key is logged."""
    from hostdev.agent import daemon
    from tests.support.agent import sample_spec, write_spec

    ran: list[Agent] = []
    monkeypatch.setattr(daemon.Agent, "run", lambda self: ran.append(self))
    monkeypatch.setattr(daemon.signal, "signal", lambda *_args: None)  # keep pytest's
    uri = write_spec(tmp_path, sample_spec())
    path = write_properties(tmp_path, f"libvirt.uri={uri}\npci.devices={SAMPLE_DEVICES}\n"
                                      "colour=blue\n")
    assert main(["--config", str(path)]) == 0
    (agent,) = ran
    assert f"guid={agent.guid}" in path.read_text()
    assert "unknown key 'colour'" in capsys.readouterr().err
    agent.hypervisor.close()
