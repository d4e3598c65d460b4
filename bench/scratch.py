"""Throw-away RabbitMQ vhosts and MariaDB databases for one bench run.

A bench script imports this sibling module (a script's own folder is on
``sys.path``): ``with vhost("deploy") as amqp_url, database("deploy") as
db_url: ...``. Each gets a random name and is deleted on exit, so benches
can run while the test suite runs.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pymysql

from hostdev.mgmt.persistence.database import upgrade

AMQP_HOST = "127.0.0.1:5672"
MARIADB_SOCKET = "/run/mysqld/mysqld.sock"


def rabbitmqctl(*args: str) -> str:
    """Runs ``rabbitmqctl`` (through ``sudo -n`` unless root) and returns its output.

    Raises:
        RuntimeError: rabbitmqctl failed; the text has its output.
    """
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    # rabbitmqctl needs the broker's Erlang cookie: root's.
    prefix = ["sudo", "-n"] if os.geteuid() != 0 and shutil.which("sudo") else []
    done = subprocess.run([*prefix, exe, "-q", *args], capture_output=True, text=True,
                          timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): "
                           f"{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


@contextmanager
def vhost(prefix: str) -> Iterator[str]:
    """Yields the guest URL of a new vhost ``hostdev-bench-<prefix>-<random>``; deletes it after."""
    name = f"hostdev-bench-{prefix}-{secrets.token_hex(4)}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{AMQP_HOST}/{name}"
    finally:
        rabbitmqctl("delete_vhost", name)


def mariadb_url(name: str) -> str:
    """Returns the SQLAlchemy URL of database ``name``, as root through the unix socket."""
    return f"mysql+pymysql://root@localhost/{name}?unix_socket={MARIADB_SOCKET}"


def _admin() -> pymysql.connections.Connection[Any]:
    return pymysql.connect(unix_socket=MARIADB_SOCKET, user="root", autocommit=True)


@contextmanager
def database(prefix: str, *, migrate: bool = True) -> Iterator[str]:
    """Yields the URL of a new ``hostdev_bench_<prefix>_<random>`` (migrated); drops it after."""
    name = f"hostdev_bench_{prefix}_{secrets.token_hex(4)}"
    with _admin() as admin, admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    try:
        if migrate:
            upgrade(mariadb_url(name))
        yield mariadb_url(name)
    finally:
        with _admin() as admin, admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
