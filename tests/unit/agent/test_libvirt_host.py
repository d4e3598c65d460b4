"""LibvirtHost's hot-plug logic against a fake virDomain (real hostdev hot-plug needs VFIO)."""

from __future__ import annotations

import libvirt
import pytest

from hostdev.agent.domain_xml import read_hostdevs, with_hostdev, without_hostdev
from hostdev.agent.errors import DetachRefused, HypervisorError
from hostdev.agent.libvirt_host import LibvirtHost, hypervisor_error
from hostdev.messages.pci_address import PciAddress as P
from tests.support.agent import NODE_XML_URI

pytestmark = pytest.mark.libvirt

NIC = P("28:00.1")
LIVE, CONFIG = libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt.VIR_DOMAIN_AFFECT_CONFIG
EMPTY = "<domain><name>v</name><uuid>u</uuid><devices/></domain>"


class FakeDomain:
    """A running domain whose guest releases devices unless ``cooperative`` is False."""

    def __init__(self, *, cooperative: bool = True) -> None:
        self.live = with_hostdev(EMPTY, NIC)
        self.config = with_hostdev(EMPTY, NIC)
        self.cooperative = cooperative
        self.calls: list[tuple[str, int]] = []

    def isActive(self) -> int:
        return 1

    def XMLDesc(self, flags: int) -> str:
        return self.config if flags & libvirt.VIR_DOMAIN_XML_INACTIVE else self.live

    def detachDeviceFlags(self, xml: str, flags: int) -> int:
        self.calls.append(("detach", flags))
        address = read_hostdevs(f"<domain><devices>{xml}</devices></domain>")[0]
        if flags & CONFIG:
            self.config = without_hostdev(self.config, address)
        if flags & LIVE and self.cooperative:
            self.live = without_hostdev(self.live, address)
        return 0

    def attachDeviceFlags(self, xml: str, flags: int) -> int:
        self.calls.append(("attach", flags))
        address = read_hostdevs(f"<domain><devices>{xml}</devices></domain>")[0]
        if flags & CONFIG:
            self.config = with_hostdev(self.config, address)
        if flags & LIVE:
            self.live = with_hostdev(self.live, address)
        return 0


def host_with(dom: FakeDomain, monkeypatch: pytest.MonkeyPatch) -> LibvirtHost:
    host = LibvirtHost("qemu:///system")
    monkeypatch.setattr(host, "lookup", lambda uuid: dom)
    return host


def test_detach_affects_live_and_config_and_returns_once_released(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A cooperative guest: one detach with LIVE|CONFIG, the device gone from both."""
    dom = FakeDomain()
    host_with(dom, monkeypatch).detach_hostdev("u", NIC, 1.0)
    assert dom.calls == [("detach", LIVE | CONFIG)]
    assert read_hostdevs(dom.live) == () and read_hostdevs(dom.config) == ()


def test_a_guest_keeping_the_device_times_out_and_the_config_is_restored(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No DEVICE_REMOVED within the timeout: DetachRefused, device back in the config."""
    dom = FakeDomain(cooperative=False)
    with pytest.raises(DetachRefused):
        host_with(dom, monkeypatch).detach_hostdev("u", NIC, 0.1)
    assert dom.calls == [("detach", LIVE | CONFIG), ("attach", CONFIG)]
    assert read_hostdevs(dom.live) == (NIC,) and read_hostdevs(dom.config) == (NIC,)


def test_attach_touches_only_what_lacks_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Live-only presence gets a CONFIG attach; presence in both gets no call at all."""
    dom = FakeDomain()
    dom.config = EMPTY
    host = host_with(dom, monkeypatch)
    host.attach_hostdev("u", NIC, 1.0)
    host.attach_hostdev("u", NIC, 1.0)
    assert dom.calls == [("attach", CONFIG)]


def test_detaching_an_absent_device_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device in neither live nor config XML is already detached: no libvirt call."""
    dom = FakeDomain()
    dom.live = dom.config = EMPTY
    host_with(dom, monkeypatch).detach_hostdev("u", NIC, 1.0)
    assert dom.calls == []


def test_a_device_removed_event_wakes_the_waiting_detach(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest releasing later (DEVICE_REMOVED) ends the wait before the timeout."""
    import threading
    import time

    dom = FakeDomain(cooperative=False)
    host = host_with(dom, monkeypatch)

    def release() -> None:
        dom.live = without_hostdev(dom.live, NIC)
        host._on_device_removed(None, dom, "hostdev0", None)

    timer = threading.Timer(0.2, release)
    timer.start()
    started = time.monotonic()
    host.detach_hostdev("u", NIC, 10.0)
    assert time.monotonic() - started < 5
    timer.join()
    assert read_hostdevs(dom.config) == ()


@pytest.mark.parametrize(("name", "transient"), [
    ("VIR_ERR_SYSTEM_ERROR", True), ("VIR_ERR_OPERATION_TIMEOUT", True),
    ("VIR_ERR_NO_CONNECT", True), ("VIR_ERR_INVALID_ARG", False),
    ("VIR_ERR_NO_DOMAIN", False), ("VIR_ERR_XML_ERROR", False)])
def test_libvirt_error_codes_are_classified_transient_or_permanent(
        name: str, transient: bool) -> None:
    """Only failures of libvirtd, the host or a guest agent are worth a retry."""
    exc = libvirt.libvirtError("failed")
    exc.err = (getattr(libvirt, name), 0, "the reason", 2, "", None, None, 0, 0)
    error = hypervisor_error("start", exc)
    assert (error.transient, error.code, error.reason) == (
        transient, getattr(libvirt, name), "the reason")


def test_an_invalid_uuid_from_real_libvirt_is_permanent() -> None:
    """libvirt's test driver refuses a malformed UUID with a permanent error."""
    host = LibvirtHost("test:///default")
    host.open()
    try:
        with pytest.raises(HypervisorError) as info:
            host.lookup("not-a-uuid")
    finally:
        host.close()
    assert info.value.transient is False and info.value.code == libvirt.VIR_ERR_INVALID_ARG


def test_the_test_driver_cannot_reset_a_node_device_and_says_so() -> None:
    """libvirt's test driver answers a node device reset 'not supported': a permanent error."""
    host = LibvirtHost(NODE_XML_URI)
    host.open()
    try:
        with pytest.raises(HypervisorError) as info:
            host.reset_pci_device(P("28:00.1"))
    finally:
        host.close()
    assert info.value.transient is False and info.value.code == libvirt.VIR_ERR_NO_SUPPORT
    assert "virNodeDeviceReset" in str(info.value)
