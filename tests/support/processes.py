"""Daemons run as real processes for end-to-end tests, with their JSON logs read back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.support.waiting import wait_for

BIN = Path(sys.executable).parent


def free_port() -> int:
    """Returns a TCP port nothing listens on now (for a daemon's metrics.port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def record_time(record: dict[str, Any]) -> float:
    """The POSIX time of a JSON log record (its ISO ``timestamp``)."""
    return datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00")).timestamp()


class Daemon:
    """One ``hostdev-agent`` or ``hostdev-mgmt`` process, logging JSON lines to a file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = [str(BIN / argv[0]), *argv[1:]]
        self.log_path = log_dir / f"{name}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("NOTIFY_SOCKET", None)
        if env and "NOTIFY_SOCKET" in env:
            self.env["NOTIFY_SOCKET"] = env["NOTIFY_SOCKET"]
        self.process: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self) -> Daemon:
        """Starts the process; its stdout and stderr go to the log file (appended)."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                        env=self.env, start_new_session=True)
        log.close()
        return self

    @property
    def running(self) -> bool:
        """True while the process has not exited."""
        return self.process is not None and self.process.poll() is None

    def records(self) -> list[dict[str, Any]]:
        """Every JSON log line so far (other lines are kept under ``raw``)."""
        if not self.log_path.exists():
            return []
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = {"raw": line}
            found.append(record if isinstance(record, dict) else {"raw": line})
        return found

    def wait_log(self, event: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Waits for a log record with this event name (and fields); fails if the process died."""
        def seen() -> dict[str, Any] | None:
            for record in self.records():
                if record.get("event") == event and all(
                        record.get(k) == v for k, v in fields.items()):
                    return record
            if not self.running:
                code = self.process.returncode if self.process else None
                raise AssertionError(
                    f"{self.name} exited with {code} before logging {event}:\n{self.tail()}")
            return None
        return wait_for(seen, timeout=timeout, what=f"{self.name} to log {event} {fields or ''}")

    def tail(self, lines: int = 40) -> str:
        """The last lines of the log, for failure messages."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """Kills the process at once (SIGKILL), as a crash would."""
        if self.process and self.running:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Asks the process to stop (SIGTERM) and waits; kills it if it does not."""
        if self.process is None:
            return None
        if self.running:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode
