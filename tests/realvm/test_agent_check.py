"""``hostdev-agent --check`` against a real libvirtd whose host has no VFIO."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hostdev.agent.libvirt_host import LibvirtHost
from tests.support.processes import BIN
from tests.support.realvm import Lab

pytestmark = pytest.mark.realvm


def _check(tmp_path: Path, properties: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "agent.properties"
    config.write_text(properties, encoding="utf-8")
    return subprocess.run([str(BIN / "hostdev-agent"), "--check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


def _a_host_device(lab: Lab) -> str:
    host = LibvirtHost(lab.a.uri)
    host.open()
    try:
        devices = host.pci_devices()
    finally:
        host.close()
    assert devices, f"libvirt at {lab.a.uri} lists no PCI device of this machine"
    return str(devices[-1].address)


def test_check_says_the_host_has_no_vfio(lab: Lab, tmp_path: Path) -> None:
    """On a host without VFIO, --check names the empty pciBackend and how to enable VFIO."""
    done = _check(tmp_path, f"libvirt.uri={lab.a.uri}\n"
                  f"pci.devices={_a_host_device(lab)}|NIC\nlog.format=console\n")
    assert "no PCI passthrough backend (empty pciBackend in the domain capabilities)" in (
        done.stderr), done.stderr
    assert "intel_iommu=on or amd_iommu=on" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_with_the_lab_option_finds_the_stand_ins_and_warns_of_no_vfio(
        lab: Lab, tmp_path: Path) -> None:
    """With lab.emulated.devices the listed devices are found as stand-ins, lab-only said."""
    done = _check(tmp_path, f"libvirt.uri={lab.a.uri}\npci.devices=28:00.1|10GE,28:00.2|10GE\n"
                  "lab.emulated.devices=yes\nlog.format=console\n")
    assert done.returncode == 0, done.stderr
    assert "2 of 2 devices found" in done.stderr
    assert "lab_emulated_devices" in done.stderr + done.stdout
    assert "pciBackend" not in done.stderr
