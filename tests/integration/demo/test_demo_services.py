"""``hostdev demo --amqp-url --db-url``: the story on RabbitMQ and MariaDB, agents as processes."""

from __future__ import annotations

import io
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostdev.demo.runner import run_in
from tests.support.databases import drop_mariadb_database, mariadb_url
from tests.support.rabbitmq import amqp_vhost

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mariadb, pytest.mark.libvirt, pytest.mark.slow]


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """A fresh vhost, deleted afterwards."""
    with amqp_vhost("demo") as vhost:
        yield vhost.url


@pytest.fixture
def db_url() -> Iterator[str]:
    """The URL of a MariaDB database that does not exist yet; dropped afterwards."""
    url = mariadb_url(f"hostdev_demo_{secrets.token_hex(4)}")
    try:
        yield url
    finally:
        drop_mariadb_database(url)


def test_demo_on_real_services(tmp_path: Path, amqp_url: str, db_url: str) -> None:
    """The demo creates its database; agents in processes deploy, refuse, migrate and stop."""
    out = io.StringIO()
    report = run_in(tmp_path, amqp_url=amqp_url, db_url=db_url, out=out)
    text = out.getvalue()
    assert "created database mysql+pymysql://root@localhost/hostdev_demo_" in text
    assert report.deployed == ["web-1", "web-2", "web-3", "ml-1", "ml-2", "ml-3"]
    assert report.refusal_reason == ("no host has 1 x GPU free: kvm-01 has 0, kvm-02 has 0, "
                                     "kvm-03 has 0")
    assert report.stopped == "web-2"
    # The hosts hand the domain over through their mailbox folders: a real migration.
    assert report.migrated == "web-1", report.migration_note
    assert re.search(r"10GE +0000:28:00.0 +0000:86:00.0", text)
    assert "AttachPciDevicesCommand sent to the destination agent (1)" in text
    assert "routing key agent.demo-kvm-03.AttachPciDevicesCommand" in text
    vms = text[text.rindex("$ hostdev vm list"):]
    assert re.search(r"web-1 +\S+ +Running +net-2x10ge +kvm-03 +0000:86:00.0,0000:86:00.1", vms)
    assert re.search(r"web-2 +\S+ +Stopped +net-2x10ge", text)
