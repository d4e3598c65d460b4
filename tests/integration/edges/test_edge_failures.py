"""A wrong broker URL, credentials, vhost or database: one line, exit 1, no traceback.

Each command runs as an operator would run it, as a process against the real
RabbitMQ and MariaDB; the failure must name the URL with its password hidden
and the cause.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from tests.support.agent import SAMPLE_DEVICES, sample_spec, write_properties, write_spec
from tests.support.databases import mariadb_url
from tests.support.processes import BIN

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mariadb, pytest.mark.libvirt]

GOOD = "amqp://guest:guest@127.0.0.1:5672/"
#: (case, URL, what the one line must say besides the masked URL)
BROKERS = [
    ("http", "http://127.0.0.1:5672/", "scheme http:// is not AMQP"),
    ("refused", "amqp://guest:secret@127.0.0.1:1/", "connection refused"),
    ("credentials", "amqp://guest:wrong-secret@127.0.0.1:5672/", "login refused"),
    ("vhost", "amqp://guest:guest@127.0.0.1:5672/hostdev-no-such-vhost",
     "vhost 'hostdev-no-such-vhost' does not exist"),
]


def masked(url: str) -> str:
    return url.replace(":secret@", ":***@").replace(":wrong-secret@", ":***@").replace(
        ":guest@", ":***@")


def run(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=timeout, check=False)


def one_line_failure(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Asserts exit 1, no traceback, and one stderr line holding every needle; returns it."""
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output, output
    lines = [line for line in done.stderr.splitlines() if all(n in line for n in needles)]
    assert len(lines) == 1, f"expected one line with {needles}:\n{output}"
    assert "secret" not in output
    return lines[0]


@pytest.mark.parametrize(("case", "url", "cause"), BROKERS, ids=[b[0] for b in BROKERS])
def test_the_cli_says_why_and_that_nothing_was_published(case: str, url: str,
                                                         cause: str) -> None:
    """``hostdev hosts`` with a bad broker: one line, exit 1; never "published"."""
    done = run(["hostdev", "hosts", "--amqp-url", url, "--timeout", "3"])
    line = one_line_failure(done, masked(url), cause)
    assert "published to exchange" not in line
    if case != "http":
        assert "ListHostsRequest was not published" in line


@pytest.mark.parametrize(("case", "url", "cause"), BROKERS, ids=[b[0] for b in BROKERS])
def test_mgmt_run_says_why_the_broker_cannot_be_reached(case: str, url: str, cause: str,
                                                         tmp_path: Path) -> None:
    """``hostdev-mgmt run`` with a bad broker: one line, exit 1, after bounded retries."""
    done = run(["hostdev-mgmt", "run", "--db-url", f"sqlite:///{tmp_path}/m.db",
                "--amqp-url", url])
    one_line_failure(done, "hostdev-mgmt: cannot connect to RabbitMQ at", masked(url), cause)


@pytest.mark.parametrize(("case", "url", "cause"), BROKERS, ids=[b[0] for b in BROKERS])
def test_the_agent_says_why_the_broker_cannot_be_reached(case: str, url: str, cause: str,
                                                         tmp_path: Path) -> None:
    """``hostdev-agent`` with a bad broker: one line, exit 1, no traceback."""
    uri = write_spec(tmp_path, sample_spec("sim-edge"))
    config = write_properties(tmp_path, (
        f"guid={uuid.uuid4()}\nname=edge\namqp.url={url}\nlibvirt.uri={uri}\n"
        f"pci.devices={SAMPLE_DEVICES}\nlog.format=json\n"))
    done = run(["hostdev-agent", "--config", str(config)])
    if case == "http":  # refused by the configuration check, before anything is contacted
        one_line_failure(done, "amqp.url must be amqp://")
    else:
        one_line_failure(done, "hostdev-agent: cannot connect to RabbitMQ at", masked(url),
                         cause)


@pytest.mark.parametrize(("case", "db_url", "cause"), [
    ("unknown", mariadb_url("hostdev_no_such_database"),
     "Unknown database 'hostdev_no_such_database' (error 1049)"),
    ("unreachable", "mysql+pymysql://root:secret@127.0.0.1:1/hostdev",
     "Connection refused"),
    ("sqlite", "sqlite:////nonexistent-dir/hostdev.db", "unable to open database file"),
], ids=["unknown", "unreachable", "sqlite"])
def test_mgmt_run_says_why_the_database_cannot_be_opened(case: str, db_url: str,
                                                         cause: str) -> None:
    """``hostdev-mgmt run`` with a bad database: one line, exit 1, password hidden."""
    done = run(["hostdev-mgmt", "run", "--db-url", db_url, "--amqp-url", GOOD])
    line = one_line_failure(done, "hostdev-mgmt: cannot open database", cause)
    assert db_url.split("@")[-1].split("?")[0] in line


def test_db_upgrade_says_why_the_database_cannot_be_opened() -> None:
    """``hostdev-mgmt db upgrade`` on a database that does not answer: one line, exit 1."""
    db_url = "mysql+pymysql://root:secret@127.0.0.1:1/hostdev"
    done = run(["hostdev-mgmt", "db", "upgrade", "--db-url", db_url])
    line = one_line_failure(done, "hostdev-mgmt: cannot open database", "Connection refused")
    assert "secret" not in line
