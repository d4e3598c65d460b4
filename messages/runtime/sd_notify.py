"""systemd's notify protocol (READY=1, WATCHDOG=1, STOPPING=1) without a dependency.

Both daemons run as ``Type=notify`` units: they say READY=1 once connected to
the broker, WATCHDOG=1 from their loop, STOPPING=1 on shutdown. Outside
systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger()


class SystemdNotifier:
    """Sends state lines to ``$NOTIFY_SOCKET``; silent when it is unset."""

    def __init__(self, address: str | None = None) -> None:
        self._address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")

    @property
    def enabled(self) -> bool:
        """True when a notify socket is configured."""
        return bool(self._address)

    def watchdog_interval_s(self) -> float | None:
        """Half of systemd's ``WatchdogSec`` (``$WATCHDOG_USEC``), or None when off."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2_000_000

    def notify(self, *lines: str) -> bool:
        """Sends ``KEY=VALUE`` lines in one datagram; returns False when nothing was sent."""
        if not self._address:
            return False
        address = self._address
        if address.startswith("@"):
            # An abstract socket: the name starts with a NUL byte.
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall("\n".join(lines).encode())
        except OSError as exc:
            log.warning("sd_notify_failed", socket=self._address, error=str(exc))
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """Tells systemd start-up is complete."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        """Pets systemd's watchdog."""
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """Tells systemd the daemon is shutting down."""
        return self.notify("STOPPING=1")
