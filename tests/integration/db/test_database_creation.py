"""Creating a missing MariaDB database (``create_database``, ``hostdev demo``), or why not."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest
from sqlalchemy import make_url, text

from hostdev.mgmt.errors import MgmtError
from hostdev.mgmt.persistence.database import create_database_engine
from hostdev.mgmt.persistence.database_creation import create_database
from tests.support.databases import (
    MARIADB_SOCKET,
    admin_connection,
    drop_mariadb_database,
    mariadb_url,
)
from tests.support.processes import BIN

pytestmark = pytest.mark.mariadb


@pytest.fixture
def missing_url() -> Iterator[str]:
    """The URL of a database that does not exist (dropped afterwards if a test made it)."""
    url = mariadb_url(f"hostdev_create_{secrets.token_hex(4)}")
    try:
        yield url
    finally:
        drop_mariadb_database(url)


@pytest.fixture
def unprivileged() -> Iterator[tuple[str, str]]:
    """A MariaDB user with no rights at all, and its password; dropped afterwards."""
    user, password = f"hostdev_nobody_{secrets.token_hex(3)}", secrets.token_hex(8)
    with admin_connection() as admin, admin.cursor() as cursor:
        cursor.execute(f"CREATE USER '{user}'@'localhost' IDENTIFIED BY '{password}'")
    try:
        yield user, password
    finally:
        with admin_connection() as admin, admin.cursor() as cursor:
            cursor.execute(f"DROP USER IF EXISTS '{user}'@'localhost'")


def test_a_missing_database_is_created_with_binary_collation(missing_url: str) -> None:
    """The first call creates the database (utf8mb4_bin); the second finds it and says so."""
    assert create_database(missing_url) is True
    assert create_database(missing_url) is False
    name = make_url(missing_url).database
    engine = create_database_engine(missing_url)
    try:
        with engine.connect() as conn:
            collation = conn.execute(text(
                "SELECT DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA "
                "WHERE SCHEMA_NAME = :name"), {"name": name}).scalar_one()
    finally:
        engine.dispose()
    assert collation == "utf8mb4_bin"


def test_a_user_who_may_not_create_gets_the_statement_to_run(
    missing_url: str, unprivileged: tuple[str, str]
) -> None:
    """Without CREATE rights the error names the database and the statement a DBA runs."""
    user, password = unprivileged
    name = str(make_url(missing_url).database)
    url = f"mysql+pymysql://{user}:{password}@localhost/{name}?unix_socket={MARIADB_SOCKET}"
    with pytest.raises(MgmtError) as failure:
        create_database(url)
    message = str(failure.value)
    assert "\n" not in message
    assert f"database {name} does not exist and {user} may not create it" in message
    assert message.endswith(
        f"have a DBA run: CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")


def test_hostdev_demo_on_a_database_it_cannot_create_says_so_in_one_line(
    missing_url: str, unprivileged: tuple[str, str]
) -> None:
    """``hostdev demo --db-url`` on a forbidden database exits 1 with one line, no traceback."""
    user, password = unprivileged
    name = make_url(missing_url).database
    url = f"mysql+pymysql://{user}:{password}@localhost/{name}?unix_socket={MARIADB_SOCKET}"
    done = subprocess.run([str(BIN / "hostdev"), "demo", "--db-url", url], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    err = done.stderr.strip()
    assert err.startswith("hostdev demo: database ") and "CREATE DATABASE" in err
    assert len(err.splitlines()) == 1
    assert password not in err
