"""The pure rules of a migration: policy refusal, device pairing, what answers mean."""

from __future__ import annotations

import pytest

from hostdev.messages.pci_address import PciAddress as P
from hostdev.messages.values import DeviceOutcome
from hostdev.mgmt.devices.device_rows import FREE, HeldDevice
from hostdev.mgmt.errors import Forbidden
from hostdev.mgmt.jobs.migration_plan import (
    check_policy,
    failed_attaches,
    missing_after_rollback,
    pair_devices,
)


def device(name: str, address: str) -> HeldDevice:
    """Returns a free device of host 1 (the rules read only its name and address)."""
    return HeldDevice(id=0, host_id=1, name=name, address=P(address), state=FREE)


def test_forbid_refuses_only_a_vm_holding_devices() -> None:
    """Forbid names devices, offering and policy; no devices or detach-attach pass."""
    held = [device("10GE", "28:00.1"), device("GPU", "3b:00.0")]
    with pytest.raises(Forbidden) as refused:
        check_policy("vm1", "net", "forbid", held)
    text = str(refused.value)
    assert "0000:28:00.1 (10GE), 0000:3b:00.0 (GPU)" in text and "'forbid'" in text
    assert "'net'" in text
    check_policy("vm1", "net", "forbid", [])
    check_policy("vm1", "net", "detach-attach", held)


def test_pairing_matches_names_in_address_order() -> None:
    """Each source device gets a destination device of its name, both sides sorted."""
    source = [device("10GE", "28:00.2"), device("GPU", "3b:00.0"),
              device("10GE", "28:00.1")]
    destination = [device("10GE", "5e:00.1"), device("GPU", "af:00.0"),
                   device("10GE", "5e:00.0"), device("10GE", "5e:00.3")]
    assert [(m.name, m.source, m.destination) for m in pair_devices(source, destination)] == [
        ("10GE", P("28:00.1"), P("5e:00.0")), ("10GE", P("28:00.2"), P("5e:00.1")),
        ("GPU", P("3b:00.0"), P("af:00.0"))]


def test_missing_after_rollback_and_failed_attaches() -> None:
    """Detached but not put back are missing; unreported devices fail unless all is ok."""
    assert missing_after_rollback((P("28:00.1"), P("28:00.2")), (P("28:00.2"),)) == (
        P("28:00.1"),)
    outcomes = (DeviceOutcome(address=P("28:00.1"), result="ok"),
                DeviceOutcome(address=P("28:00.2"), result="error", details="busy"))
    wanted = (P("28:00.1"), P("28:00.2"), P("28:00.3"))
    assert failed_attaches(wanted, outcomes, answer_ok=False) == (
        (P("28:00.2"), "busy"), (P("28:00.3"), "not attached (the agent gave no outcome)"))
    assert failed_attaches(wanted[:1], outcomes[:1], answer_ok=True) == ()
