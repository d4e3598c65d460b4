"""Tests of the systemd notify protocol client."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from hostdev.messages.runtime.sd_notify import SystemdNotifier


@pytest.fixture()
def notify_socket(tmp_path: Path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield str(path), sock
    sock.close()


def test_ready_sends_ready_and_status(notify_socket) -> None:
    """ready() sends READY=1 and the status line in one datagram."""
    path, sock = notify_socket
    assert SystemdNotifier(path).ready("connected")
    assert sock.recv(4096).decode().split("\n") == ["READY=1", "STATUS=connected"]


def test_without_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd every call is a no-op that reports False."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert notifier.ready() is False


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog is petted at half of systemd's WatchdogSec."""
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert SystemdNotifier("x").watchdog_interval_s() == 10.0


def test_unreachable_socket_is_reported_not_raised(tmp_path: Path) -> None:
    """A notify socket that is gone makes notify() return False instead of raising."""
    assert SystemdNotifier(str(tmp_path / "gone.sock")).watchdog() is False
