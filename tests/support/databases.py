"""Creates throw-away databases (MariaDB or SQLite) for tests, and rows to fill them.

MariaDB: root through the unix socket creates ``hostdev_test_<random>`` and
drops it afterwards. Reuse from any conftest::

    @pytest.fixture(scope="module")
    def db_url():
        with mariadb_database() as url:   # migrated to head
            yield url
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import pymysql
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, insert, make_url, select

from hostdev.mgmt.persistence.database import alembic_config, create_database_engine, upgrade
from hostdev.mgmt.persistence.models import Host, HostBlock, ServiceOffering, VmInstance
from hostdev.mgmt.placement import blocks

MARIADB_SOCKET: Final = os.environ.get("HOSTDEV_TEST_MARIADB_SOCKET", "/run/mysqld/mysqld.sock")


def head_revision(url: str) -> str:
    """Returns the newest revision the migrations hold."""
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert head is not None
    return head


def mariadb_url(database: str) -> str:
    """Returns the URL of ``database`` on the local MariaDB, as root through the socket."""
    return f"mysql+pymysql://root@localhost/{database}?unix_socket={MARIADB_SOCKET}"


def connect_url(url: str) -> pymysql.connections.Connection[Any]:
    """Opens an autocommit connection (rows as dicts) to the database a MariaDB URL names.

    Through the URL's ``unix_socket``, else its host and port (Galera nodes).
    """
    parsed = make_url(url)
    where: dict[str, Any] = ({"unix_socket": parsed.query["unix_socket"]}
                             if "unix_socket" in parsed.query
                             else {"host": parsed.host, "port": parsed.port or 3306})
    return pymysql.connect(**where, user=parsed.username or "root", password=parsed.password or "",
                           database=parsed.database, autocommit=True,
                           cursorclass=pymysql.cursors.DictCursor)


def admin_connection() -> pymysql.connections.Connection[Any]:
    """Opens an autocommit connection to the local MariaDB as root (through the socket)."""
    return pymysql.connect(unix_socket=MARIADB_SOCKET, user="root", autocommit=True)


def create_mariadb_database(prefix: str = "hostdev_test", *, migrate: bool = True) -> str:
    """Creates an empty database with a random name, optionally migrated; returns its URL."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with admin_connection() as admin, admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    url = mariadb_url(name)
    if migrate:
        try:
            upgrade(url)
        except BaseException:
            drop_mariadb_database(url)
            raise
    return url


def drop_mariadb_database(url: str) -> None:
    """Drops the database a URL from :func:`create_mariadb_database` names (if it exists)."""
    name = make_url(url).database
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"refusing to drop database {name!r}: not a test database name")
    with admin_connection() as admin, admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")


@contextmanager
def mariadb_database(prefix: str = "hostdev_test", *, migrate: bool = True) -> Iterator[str]:
    """Yields the URL of a fresh MariaDB database and drops it on exit."""
    url = create_mariadb_database(prefix, migrate=migrate)
    try:
        yield url
    finally:
        drop_mariadb_database(url)


@contextmanager
def sqlite_database(folder: Path, *, migrate: bool = True) -> Iterator[str]:
    """Yields the URL of a fresh SQLite file in ``folder`` (WAL files included)."""
    path = folder / f"hostdev-{secrets.token_hex(4)}.db"
    url = f"sqlite:///{path}"
    if migrate:
        upgrade(url)
    try:
        yield url
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


@contextmanager
def migrated_engine(backend: str, folder: Path, prefix: str) -> Iterator[Engine]:
    """Yields an engine on a fresh migrated database: ``mariadb`` (named after ``prefix``) or
    ``sqlite`` (a file in ``folder``); for fixtures parametrised over both back ends."""
    made = mariadb_database(prefix) if backend == "mariadb" else sqlite_database(folder)
    with made as url:
        engine = create_database_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


def add_host(conn: Connection, *, name: str | None = None, status: str = "Up",
             cpus: int = 32, memory_mb: int = 131072) -> int:
    """Inserts a host with a random guid; returns its id."""
    guid = str(uuid.uuid4())
    result = conn.execute(insert(Host).values(
        guid=guid, name=name or f"host-{guid[:8]}", status=status, cpus=cpus,
        memory_mb=memory_mb, hypervisor_version="test",
    ))
    host_id = int(result.inserted_primary_key[0])
    blocks.raise_host(conn, host_id)  # as its registration would
    return host_id


def raise_blocks(conn: Connection) -> None:
    """Sets placement's blocks for hosts inserted as rows, as their registrations would."""
    blocks.raise_rows(conn, conn.execute(
        select(Host.id, Host.cpus - Host.used_cpus, Host.memory_mb - Host.used_memory_mb)
        .where(Host.status == "Up")).all())


def uncovered_hosts(conn: Connection) -> list[tuple[int, int, int]]:
    """Returns the Up hosts (id, free CPUs, free memory) whose block has neither their
    cell's bit nor one of a cell above it in both: hosts placement's search would skip
    for a VM asking exactly their room. Always empty."""
    cells = {int(block): int(bits)
             for block, bits in conn.execute(select(HostBlock.block, HostBlock.cells))}
    return [(host_id, free_cpus, free_memory_mb) for host_id, free_cpus, free_memory_mb
            in conn.execute(select(Host.id, Host.cpus - Host.used_cpus,
                                   Host.memory_mb - Host.used_memory_mb)
                            .where(Host.status == "Up"))
            if not cells.get(blocks.block_of(host_id), 0) & blocks.wanted(free_cpus,
                                                                          free_memory_mb)]


def add_offering(conn: Connection, *, name: str | None = None, cpus: int = 2,
                 memory_mb: int = 2048, migration_policy: str = "detach-attach") -> int:
    """Inserts a service offering (no PCI requests); returns its id."""
    result = conn.execute(insert(ServiceOffering).values(
        name=name or f"offering-{secrets.token_hex(4)}", cpus=cpus, memory_mb=memory_mb,
        migration_policy=migration_policy,
    ))
    return int(result.inserted_primary_key[0])


def add_vms(conn: Connection, offering_id: int, count: int, *, state: str = "Stopped") -> list[int]:
    """Inserts ``count`` VMs of an offering; returns their ids in order."""
    ids = []
    for _ in range(count):
        vm_uuid = str(uuid.uuid4())
        result = conn.execute(insert(VmInstance).values(
            uuid=vm_uuid, name=f"vm-{vm_uuid[:8]}", offering_id=offering_id, state=state,
            cpus=2, memory_mb=2048,
        ))
        ids.append(int(result.inserted_primary_key[0]))
    return ids
