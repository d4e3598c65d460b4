"""A RabbitMQ vhost of its own per test module or run, created and deleted with rabbitmqctl.

Usage (pytest)::

    from tests.support.rabbitmq import amqp_vhost

    @pytest.fixture(scope="module")
    def amqp_url():
        with amqp_vhost() as vhost:
            yield vhost.url

Or in a plain script: ``with amqp_vhost("bench") as vhost: ...``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote

HOST = "127.0.0.1"
PORT = 5672
USER = "guest"
PASSWORD = "guest"


@dataclass(frozen=True)
class Vhost:
    """A vhost created for a test; ``url`` logs in as guest with every permission."""

    name: str

    @property
    def url(self) -> str:
        """The AMQP URL of the vhost."""
        return f"amqp://{USER}:{PASSWORD}@{HOST}:{PORT}/{quote(self.name, safe='')}"

    def close_connections(self, reason: str = "closed by a hostdev test") -> None:
        """Closes every client connection of this vhost (and only of this vhost)."""
        rabbitmqctl("close_all_connections", "--vhost", self.name, "--limit", "1000", reason)

    def list_connections(self) -> list[str]:
        """Returns the names of the client connections open on this vhost."""
        out = rabbitmqctl("list_connections", "--silent", "vhost", "name")
        return [line.split("\t", 1)[1] for line in out.splitlines()
                if line.split("\t", 1)[0] == self.name]

    def queue_depth(self, queue: str) -> int:
        """Returns the number of messages in ``queue``, ready or unacked (via rabbitmqctl)."""
        out = rabbitmqctl("list_queues", "--silent", "-p", self.name, "name", "messages")
        for line in out.splitlines():
            name, _, count = line.partition("\t")
            if name == queue:
                return int(count)
        raise LookupError(f"queue {queue!r} does not exist in vhost {self.name!r}")


def rabbitmqctl(*args: str) -> str:
    """Runs ``rabbitmqctl`` and returns its output.

    Raises:
        RuntimeError: rabbitmqctl is missing or failed; the text has its output.
    """
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    # rabbitmqctl needs the broker's Erlang cookie: root's, or sudo's for anyone else.
    prefix = ["sudo", "-n"] if os.geteuid() != 0 and shutil.which("sudo") else []
    try:
        done = subprocess.run([*prefix, exe, "-q", *args], capture_output=True, text=True,
                              timeout=60, check=False)
    except FileNotFoundError as exc:
        raise RuntimeError("rabbitmqctl not found; install rabbitmq-server or run `make services`"
                           ) from exc
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): "
                           f"{done.stderr.strip() or done.stdout.strip()}; the integration "
                           "tests need rabbitmqctl as root (or password-less sudo)")
    return done.stdout


@contextmanager
def amqp_vhost(prefix: str = "test") -> Iterator[Vhost]:
    """Creates ``hostdev-<prefix>-<random>`` with full permissions for guest; deletes it after."""
    vhost = Vhost(f"hostdev-{prefix}-{secrets.token_hex(4)}")
    rabbitmqctl("add_vhost", vhost.name)
    try:
        rabbitmqctl("set_permissions", "-p", vhost.name, USER, ".*", ".*", ".*")
        yield vhost
    finally:
        rabbitmqctl("delete_vhost", vhost.name)
