"""Fixtures of the real tier: two libvirtd daemons (QEMU/TCG) and a guest that boots.

Every module under tests/realvm is marked ``realvm`` (``pytest -m realvm``). The ``lab`` fixture
(session scope) sets up what the tier needs on a fresh machine and stops
the daemons at the end (tests/support/realvm.py); anything missing FAILS the
tier with what to do, it never skips. ``hosts`` opens a ``LabHost`` on each
daemon and removes every domain left on either after the test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostdev.agent.errors import HypervisorError
from hostdev.agent.lab_host import LabHost
from hostdev.messages.pci_address import PciAddress
from tests.support.realvm import GuestFiles, Lab, lab_template, real_lab

#: The devices each lab host stands in for (guest slots 0x10, 0x11).
A_DEVICES = (PciAddress("28:00.1"), PciAddress("28:00.2"))
B_DEVICES = (PciAddress("3b:00.0"), PciAddress("3b:00.1"))


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Two libvirtd daemons and the guest's boot files, torn down after the session."""
    with real_lab(tmp_path_factory.mktemp("realvm")) as created:
        yield created


@dataclass(frozen=True)
class Hosts:
    """A ``LabHost`` on each daemon, and where guests write their consoles."""

    a: LabHost
    b: LabHost
    consoles: Path
    guest: GuestFiles

    def template(self, *, refuse_unplug: bool = False) -> str:
        """The lab guest's template (see ``lab_template``)."""
        return lab_template(self.guest, self.consoles, refuse_unplug=refuse_unplug)


def _clean(host: LabHost) -> None:
    for domain in host.domains():
        with contextlib.suppress(HypervisorError):
            host.destroy(domain.uuid)
            host.undefine(domain.uuid)


@pytest.fixture
def hosts(lab: Lab, tmp_path: Path) -> Iterator[Hosts]:
    """Opens a ``LabHost`` on each daemon; removes every domain on both afterwards."""
    a, b = LabHost(lab.a.uri, A_DEVICES), LabHost(lab.b.uri, B_DEVICES)
    a.open()
    b.open()
    try:
        yield Hosts(a=a, b=b, consoles=tmp_path, guest=lab.guest)
    finally:
        for host in (a, b):
            _clean(host)
            host.close()
