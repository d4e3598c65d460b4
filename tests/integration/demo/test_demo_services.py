"""``hostdev demo --amqp-url --db-url``: the story on RabbitMQ and MariaDB, agents as processes."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostdev.demo.runner import run_in
from tests.support.databases import mariadb_database
from tests.support.rabbitmq import amqp_vhost

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mariadb, pytest.mark.libvirt, pytest.mark.slow]


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """A fresh vhost, deleted afterwards."""
    with amqp_vhost("demo") as vhost:
        yield vhost.url


@pytest.fixture
def db_url() -> Iterator[str]:
    """A fresh, empty MariaDB database (the demo creates the schema), dropped afterwards."""
    with mariadb_database("hostdev_demo", migrate=False) as url:
        yield url


def test_demo_on_real_services(tmp_path: Path, amqp_url: str, db_url: str) -> None:
    """Agents in processes come Up over RabbitMQ; deploys, the refusal and the stop happen."""
    out = io.StringIO()
    report = run_in(tmp_path, amqp_url=amqp_url, db_url=db_url, out=out)
    text = out.getvalue()
    assert report.deployed == ["web-1", "web-2", "web-3", "ml-1", "ml-2", "ml-3"]
    assert report.refusal_reason == ("no host has 1 x GPU free: kvm-01 has 0, kvm-02 has 0, "
                                     "kvm-03 has 0")
    assert report.stopped == "web-2"
    # Simulated hosts in separate processes cannot migrate: the plan is shown instead.
    assert report.migrated == ""
    assert "separate processes" in report.migration_note
    assert re.search(r"10GE +0000:28:00.0 +0000:86:00.0", text)
    assert re.search(r"web-2 +\S+ +Stopped +net-2x10ge", text)
