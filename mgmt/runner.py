"""``hostdev-mgmt run``: loads mgmt.properties and runs a ManagementService until stopped.

SIGTERM and SIGINT stop the loop after the message in hand (nothing is acked
before its transaction committed, so nothing is lost). With systemd
``Type=notify`` the daemon reports READY once it consumes and STOPPING on
the way out. The schema must be current: ``hostdev-mgmt db upgrade`` first
(a fresh SQLite file, the embedded default, is created and migrated here).
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Callable
from functools import partial
from types import FrameType
from typing import Any

import structlog
from sqlalchemy import make_url

from hostdev.messages.bus.failures import is_transient
from hostdev.messages.errors import MessageError
from hostdev.messages.runtime.backoff import retry
from hostdev.messages.runtime.logging import configure_logging
from hostdev.messages.runtime.sd_notify import SystemdNotifier
from hostdev.mgmt.config import MgmtConfig, load_config
from hostdev.mgmt.errors import MgmtError
from hostdev.mgmt.metrics import serve_mgmt_metrics
from hostdev.mgmt.persistence import database
from hostdev.mgmt.persistence.database_failover import first_url, safe_urls

log = structlog.get_logger()


def _db_transient(exc: Exception) -> bool:
    return isinstance(exc, database.DatabaseUnreachable) and not exc.permanent


def check_schema(config: MgmtConfig) -> None:
    """Makes sure the database has the schema; migrates a brand-new SQLite file.

    A database server that does not answer is tried a few times with backoff.

    Raises:
        MgmtError: MariaDB/MySQL without the schema; says which command to run.
        DatabaseUnreachable: the database cannot be opened; one line, URL and cause.
    """
    revision = retry(lambda: database.current_revision(config.db_url),
                     transient=_db_transient, what="database")
    if revision is not None:
        return
    if make_url(first_url(config.db_url)).get_backend_name() == "sqlite":
        database.upgrade(config.db_url)
        return
    raise MgmtError(f"database {safe_urls(config.db_url)} has no hostdev "
                    "schema; run: hostdev-mgmt db upgrade --db-url URL")


def _ignore_result(fn: Callable[[], object]) -> None:
    fn()


def run(config: MgmtConfig, *, name: str | None = None) -> int:
    """Runs the management daemon with ``config`` until SIGTERM/SIGINT; returns exit status."""
    from hostdev.messages.bus import Bus, BusConfig
    from hostdev.mgmt.service import ManagementService

    check_schema(config)
    engine = database.create_database_engine(config.db_url)
    bus = Bus(BusConfig(url=config.amqp_url, app_id="hostdev-mgmt",
                        queue_type=config.amqp_queue_type))
    try:  # a broker still starting is waited for a little; a wrong URL is not
        retry(bus.connect, transient=is_transient, what="broker")
    except BaseException:
        engine.dispose()
        raise
    service = ManagementService(config, bus, engine, name=name)
    notifier = SystemdNotifier()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("mgmt_stopping", signal=signal.Signals(signum).name)
        notifier.stopping()
        service.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    metrics_server = None
    try:
        service.start()
        metrics_server = serve_mgmt_metrics(config.metrics_port, engine)  # off unless set
        notifier.ready("consuming hostdev.mgmt and hostdev.api")
        watchdog = notifier.watchdog_interval_s()
        if watchdog:
            bus.call_every(watchdog, partial(_ignore_result, notifier.watchdog))
        service.run()
    finally:
        if metrics_server is not None:
            metrics_server.close()
        service.close()
        engine.dispose()
    log.info("mgmt_stopped", service=service.name)
    return 0


def _run_command(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else MgmtConfig()
    overrides: dict[str, Any] = {}
    if args.db_url:
        overrides["db_url"] = args.db_url
    if args.amqp_url:
        overrides["amqp_url"] = args.amqp_url
    if overrides:
        config = MgmtConfig(**{**config.__dict__, **overrides})
    configure_logging(config.log_level, json=config.log_format == "json")
    try:
        return run(config, name=args.name)
    except MessageError as exc:  # the bus: broker unreachable, queue mismatch...
        # One line on stderr (hostdev-mgmt's main prints it), no traceback.
        raise MgmtError(str(exc)) from None


def add_run_command(subparsers: Any) -> None:
    """Registers ``run --config mgmt.properties``."""
    parser = subparsers.add_parser("run", help="run the management daemon")
    parser.add_argument("--config", default=None,
                        help="mgmt.properties (default: built-in defaults, SQLite file)")
    parser.add_argument("--db-url", default=None, help="overrides db.url")
    parser.add_argument("--amqp-url", default=None, help="overrides amqp.url")
    parser.add_argument("--name", default=None,
                        help="this daemon's name in logs (default: hostname-pid)")
    parser.set_defaults(handler=_run_command)
