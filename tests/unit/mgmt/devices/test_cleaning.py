"""Devices released on a host that resets them: cleaning, the reset answers, and their trust."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from hostdev.messages import api
from hostdev.messages.commands import ErrorAnswer, ResetPciDevicesAnswer, ResetPciDevicesCommand
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DeviceOutcome
from hostdev.mgmt.devices.device_rows import address_of
from hostdev.mgmt.errors import ForgedAnswer
from hostdev.mgmt.persistence.models import PciDevice
from tests.support.mgmt_harness import Harness, Published, devices

A0 = PciAddress("0000:28:00.0")
A1 = PciAddress("0000:28:00.1")


@pytest.fixture
def h(engine: Engine) -> Harness:
    """Host g1 resets released devices (two 10GE), g2 does not; offering net1 asks one 10GE."""
    harness = Harness(engine)
    harness.register("g1", "h1", devices(2), reset_on_release=True)
    harness.register("g2", "h2", devices(2))
    harness.api(api.CreateOfferingRequest(name="net1", pci_devices="10GE"))
    return harness


def _states(engine: Engine, host_id: int = 1) -> dict[PciAddress, tuple[str, str]]:
    with Session(engine) as session:
        return {address_of(d): (d.state, d.reason) for d in session.scalars(
            select(PciDevice).where(PciDevice.host_id == host_id))}


def _run_and_stop(h: Harness, name: str, on: str = "g1") -> None:
    avoid = ("g2",) if on == "g1" else ("g1",)
    accepted = h.api(api.DeployVmRequest(name=name, offering="net1", avoid=avoid))
    assert isinstance(accepted, api.JobAccepted), accepted
    h.answer()
    assert isinstance(h.api(api.StopVmRequest(vm=name)), api.JobAccepted)
    h.answer()


def _resets(h: Harness) -> list[Published]:
    return h.commands(ResetPciDevicesCommand)


def _answer(h: Harness, command: Published, *outcomes: DeviceOutcome, guid: str = "g1",
            correlation_id: str | None = None) -> None:
    h.answered.add(command.message_id)
    h.from_agent(guid, ResetPciDevicesAnswer(devices=outcomes),
                 correlation_id=correlation_id or command.message_id)


def test_a_released_device_waits_in_cleaning_until_its_reset_is_reported(
        h: Harness, engine: Engine) -> None:
    """Stop on a resetting host: the device is cleaning, not offered; the reset frees it."""
    _run_and_stop(h, "vm1")
    assert _states(engine)[A0] == ("cleaning", "")
    (command,) = _resets(h)
    assert command.routing_key == "agent.g1.ResetPciDevicesCommand"
    assert isinstance(command.message, ResetPciDevicesCommand)
    assert command.message.addresses == (A0,)
    refused = h.api(api.SetPciDeviceEnabledRequest(host="h1", address=A0, enabled=False))
    assert isinstance(refused, ErrorAnswer) and refused.code == "conflict"
    assert "is cleaning: its agent is resetting it" in refused.details
    free = h.api(api.ListPciDevicesRequest(host="h1", free_only=True))
    assert isinstance(free, api.PciDeviceList) and [d.address for d in free.devices] == [A1]
    _answer(h, command, DeviceOutcome(address=A0, result="ok"))
    assert _states(engine)[A0] == ("free", "")
    _run_and_stop(h, "vm2", on="g2")  # a host that does not reset frees at once
    assert _states(engine, 2)[A0] == ("free", "") and _resets(h) == []


def test_a_failed_reset_quarantines_the_device_and_enable_asks_again(
        h: Harness, engine: Engine) -> None:
    """A failed reset: quarantined with its reason, held by nobody, kept; enable retries."""
    _run_and_stop(h, "vm1")
    (command,) = _resets(h)
    _answer(h, command, DeviceOutcome(address=A0, result="error",
                                      details="reset failed: no FLR, bus shared"))
    assert _states(engine)[A0] == ("quarantined", "reset failed: no FLR, bus shared")
    listed = h.api(api.ListPciDevicesRequest(host="h1"))
    assert isinstance(listed, api.PciDeviceList)
    assert [(d.address, d.vm_uuid) for d in listed.devices if d.state == "quarantined"] == [
        (A0, None)]
    h.register("g1", "h1", devices(2), reset_on_release=True)  # reported again: stays
    assert _states(engine)[A0][0] == "quarantined"
    refused = h.api(api.SetPciDeviceEnabledRequest(host="h1", address=A0, enabled=False))
    assert isinstance(refused, ErrorAnswer) and refused.code == "conflict"
    assert "its reset failed; `hostdev device enable` asks" in refused.details
    changed = h.api(api.SetPciDeviceEnabledRequest(host="h1", address=A0, enabled=True))
    assert isinstance(changed, api.DeviceStateChanged) and changed.device.state == "cleaning"
    (retry,) = _resets(h)
    _answer(h, retry, DeviceOutcome(address=A0, result="ok"))
    assert _states(engine)[A0] == ("free", "")


def test_only_the_asked_host_and_the_asked_devices_count(h: Harness, engine: Engine) -> None:
    """Another host's answer, a guessed id, a missing id are refused; unasked devices ignored."""
    _run_and_stop(h, "vm1")
    (command,) = _resets(h)
    ok = DeviceOutcome(address=A0, result="ok")
    with pytest.raises(ForgedAnswer, match="no ResetPciDevicesCommand management sent to "
                                           "that host"):
        _answer(h, command, ok, guid="g2")
    with pytest.raises(ForgedAnswer, match="correlates to guessed"):
        _answer(h, command, ok, correlation_id="guessed")
    with pytest.raises(ForgedAnswer, match="correlates to nothing"):
        h.from_agent("g1", ResetPciDevicesAnswer(devices=(ok,)))
    assert _states(engine)[A0] == ("cleaning", "")
    _answer(h, command, DeviceOutcome(address=A1, result="error", details="not asked"), ok)
    assert _states(engine) == {A0: ("free", ""), A1: ("free", "")}


def test_cleaning_devices_are_asked_again_when_their_host_registers(
        h: Harness, engine: Engine) -> None:
    """A reset never answered is asked again at start-up; a host that stopped resetting frees."""
    _run_and_stop(h, "vm1")
    (lost,) = _resets(h)
    h.answered.add(lost.message_id)
    h.register("g1", "h1", devices(2), reset_on_release=True)
    (again,) = _resets(h)
    assert isinstance(again.message, ResetPciDevicesCommand)
    assert again.message.addresses == (A0,) and again.message_id != lost.message_id
    h.answered.add(again.message_id)
    h.register("g1", "h1", devices(2), reset_on_release=False)
    assert _states(engine)[A0] == ("free", "") and _resets(h) == []
