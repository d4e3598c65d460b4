"""Runs ``hostdev demo``: sets up a cloud, tells the story, tears everything down.

Without options everything lives in this process: the in-process bus and a
SQLite file in a temporary directory, gone afterwards. With ``--amqp-url`` and
``--db-url`` management runs here against the real broker and database, and
each simulated host is a ``hostdev-agent`` process; a MariaDB database that
does not exist yet is created (``utf8mb4_bin``), or the demo says in one line
how to create it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from hostdev.demo.cloud import Cloud, DemoError, InProcessCloud, ServiceCloud, safe_db_url
from hostdev.demo.scenario import DemoReport, run_scenario
from hostdev.messages import api
from hostdev.messages.errors import MessageError
from hostdev.messages.runtime.logging import configure_logging
from hostdev.mgmt.errors import MgmtError


def open_cloud(directory: Path, *, amqp_url: str | None, db_url: str | None,
               out: TextIO) -> Cloud:
    """Starts the cloud the options ask for and says what it is."""
    cloud: InProcessCloud | ServiceCloud
    if amqp_url:
        if not db_url:
            raise DemoError("--amqp-url needs --db-url too: agents in other processes need "
                            "management on a database of its own, e.g. "
                            "--db-url mysql+pymysql://hostdev:SECRET@localhost/hostdev_demo")
        out.write(f"hostdev demo on real services: broker {amqp_url.split('@')[-1]}, "
                  f"database {safe_db_url(db_url)}; agents run as hostdev-agent processes "
                  f"(logs in {directory})\n")
        cloud = ServiceCloud(directory, amqp_url=amqp_url, db_url=db_url)
        _start(cloud, db_url, out)
    else:
        out.write("hostdev demo: management and three simulated hosts in this process, on "
                  "the in-process bus, database "
                  f"{safe_db_url(db_url) if db_url else 'a SQLite file in ' + str(directory)}\n")
        cloud = InProcessCloud(directory, db_url=db_url)
        _start(cloud, db_url, out)
    _require_empty(cloud)
    return cloud


def _start(cloud: InProcessCloud | ServiceCloud, db_url: str | None, out: TextIO) -> None:
    """Says whether the database was created, then starts the cloud (closed if that fails)."""
    if cloud.created_database and db_url:
        out.write(f"created database {safe_db_url(db_url)} (utf8mb4, binary collation)\n")
    try:
        cloud.start()
    except BaseException:
        cloud.close()
        raise


def _require_empty(cloud: Cloud) -> None:
    vms = cloud.request(api.ListVmsRequest(), 10.0)
    offerings = cloud.request(api.ListOfferingsRequest(), 10.0)
    if (isinstance(vms, api.VmList) and vms.vms) or (
            isinstance(offerings, api.OfferingList) and offerings.offerings):
        cloud.close()
        raise DemoError("the database already holds VMs or offerings; the demo needs an empty "
                        "one (create a new database and pass it with --db-url)")


def run_in(directory: Path, *, amqp_url: str | None = None, db_url: str | None = None,
           out: TextIO = sys.stdout) -> DemoReport:
    """Runs the whole demo with its files in ``directory``; returns what happened."""
    cloud = open_cloud(directory, amqp_url=amqp_url, db_url=db_url, out=out)
    try:
        return run_scenario(cloud, out)
    finally:
        cloud.close()


def run_demo(args: argparse.Namespace) -> int:
    """Runs ``hostdev demo`` and returns the exit status."""
    # The daemons log at info; the demo's reader wants the story, warnings aside.
    configure_logging("warning", json=False)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="hostdev-demo-") as tmp:
            report = run_in(Path(tmp), amqp_url=args.amqp_url, db_url=args.db_url)
    except (DemoError, MessageError, MgmtError) as exc:
        print(f"hostdev demo: {exc}", file=sys.stderr)
        return 1
    print(f"\nThe demo took {time.monotonic() - started:.1f} s.")
    if report.migration_note:
        print(report.migration_note)
    return 0 if report.refused and report.stopped and report.migrated else 1
