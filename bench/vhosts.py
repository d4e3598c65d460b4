"""A throw-away RabbitMQ vhost for a bench run, created and deleted with rabbitmqctl.

Lives next to the bench scripts (a script's own folder is on ``sys.path``), so
``python bench/bus.py`` needs nothing from the test suite::

    from vhosts import throwaway_vhost

    with throwaway_vhost("bench") as url:
        ...

rabbitmqctl needs the broker's Erlang cookie: run as root, or with
password-less sudo.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

HOST = "127.0.0.1"
PORT = 5672
USER = "guest"
PASSWORD = "guest"


def rabbitmqctl(*args: str) -> str:
    """Runs ``rabbitmqctl`` and returns its output.

    Raises:
        RuntimeError: rabbitmqctl is missing or failed; the text has its output.
    """
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    prefix = ["sudo", "-n"] if os.geteuid() != 0 and shutil.which("sudo") else []
    try:
        done = subprocess.run([*prefix, exe, "-q", *args], capture_output=True, text=True,
                              timeout=60, check=False)
    except FileNotFoundError as exc:
        raise RuntimeError("rabbitmqctl not found; the bench needs a local RabbitMQ") from exc
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): "
                           f"{done.stderr.strip() or done.stdout.strip()}; run the bench as "
                           "root or with password-less sudo")
    return done.stdout


@contextmanager
def throwaway_vhost(prefix: str = "bench") -> Iterator[str]:
    """Creates ``hostdev-<prefix>-<random>`` for guest and yields its AMQP URL; deletes it after."""
    name = f"hostdev-{prefix}-{secrets.token_hex(4)}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, USER, ".*", ".*", ".*")
        yield f"amqp://{USER}:{PASSWORD}@{HOST}:{PORT}/{quote(name, safe='')}"
    finally:
        rabbitmqctl("delete_vhost", name)
