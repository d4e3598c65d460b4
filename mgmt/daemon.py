"""Runs ``hostdev-mgmt``: the management daemon's command line.

Commands::

    hostdev-mgmt run [--config mgmt.properties]        # the daemon
    hostdev-mgmt db upgrade [--config F | --db-url URL] [--revision REV]
    hostdev-mgmt db current [--config F | --db-url URL]
    hostdev-mgmt db schema  [--db-url URL]             # offline SQL, for DBAs
    hostdev-mgmt rabbitmq-user add GUID [--apply]      # an agent's broker user

Structure for whoever adds more (the daemon's ``run``, ...): each command
group has an ``add_<group>_commands(subparsers)`` function that registers its
sub-commands and sets ``handler`` (a function taking the parsed namespace
and returning the exit status) with ``set_defaults``; :func:`build_parser`
calls each of them and :func:`main` dispatches. Keep handlers thin: they
parse, call into the modules that do the work, and print.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, Final

from hostdev.messages.bus.contract import QUEUE_TYPES
from hostdev.mgmt.config import load_config
from hostdev.mgmt.errors import MgmtError
from hostdev.mgmt.persistence import database
from hostdev.mgmt.rabbitmq_users import agent_user_recipe, apply_recipe
from hostdev.mgmt.runner import add_run_command

DB_URL_ENV: Final = "HOSTDEV_DB_URL"


def _add_db_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db-url",
        default=os.environ.get(DB_URL_ENV),
        help=f"database URL, mysql+pymysql://... or sqlite:///path (default: ${DB_URL_ENV}, "
             "else db.url of --config)",
    )
    parser.add_argument("--config", default=None,
                        help="mgmt.properties whose db.url to use, as `run --config` does")


def _db_url(args: argparse.Namespace) -> str:
    url: str | None = args.db_url
    if not url and args.config:
        url = load_config(args.config).db_url
    if not url:
        raise MgmtError(
            f"no database URL: pass --config /etc/hostdev/mgmt.properties, --db-url "
            f"mysql+pymysql://user@host/hostdev (or sqlite:///path/hostdev.db), or set "
            f"{DB_URL_ENV}"
        )
    return url


def _db_upgrade(args: argparse.Namespace) -> int:
    database.upgrade(_db_url(args), args.revision)
    print(f"database at revision {database.current_revision(_db_url(args))}")
    return 0


def _db_current(args: argparse.Namespace) -> int:
    revision = database.current_revision(_db_url(args))
    print(revision if revision is not None else "none (no schema yet: run `db upgrade`)")
    return 0


def _db_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(database.offline_sql(args.db_url or "mysql+pymysql://", args.revision))
    return 0


def add_db_commands(subparsers: Any) -> None:
    """Registers ``db upgrade``, ``db current`` and ``db schema``."""
    db = subparsers.add_parser("db", help="manage the database schema (Alembic)")
    commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")

    upgrade = commands.add_parser("upgrade", help="apply the migrations")
    _add_db_url(upgrade)
    upgrade.add_argument("--revision", default="head", help="target revision (default: head)")
    upgrade.set_defaults(handler=_db_upgrade)

    current = commands.add_parser("current", help="print the database's revision")
    _add_db_url(current)
    current.set_defaults(handler=_db_current)

    schema = commands.add_parser(
        "schema", help="print the migrations as SQL without connecting (default dialect: MySQL)"
    )
    schema.add_argument("--db-url", default=None,
                        help="URL whose dialect to render for (default: mysql+pymysql://)")
    schema.add_argument("--revision", default="head", help="target revision (default: head)")
    schema.set_defaults(handler=_db_schema)


def _rabbitmq_user_add(args: argparse.Namespace) -> int:
    recipe = agent_user_recipe(args.guid, vhost=args.vhost, password=args.password,
                               queue_type=args.queue_type)
    if args.apply:
        apply_recipe(recipe)
        print(f"created broker user {recipe.user} in vhost {recipe.vhost}; in the agent's "
              f"agent.properties set:\namqp.url=amqp://{recipe.user}:{recipe.password}@"
              f"<broker>:5672/{'' if recipe.vhost == '/' else recipe.vhost}")
    else:
        print(recipe.shell())
    return 0


def add_rabbitmq_user_commands(subparsers: Any) -> None:
    """Registers ``rabbitmq-user add GUID [--apply]``."""
    group = subparsers.add_parser("rabbitmq-user", help="broker users for agents")
    commands = group.add_subparsers(dest="rabbitmq_user_command", required=True,
                                    metavar="COMMAND")
    add = commands.add_parser(
        "add", help="print (or --apply) the rabbitmqctl recipe for user agent-GUID, who may "
                    "publish only mgmt.GUID.* and read only its own queue")
    add.add_argument("guid", help="the agent's guid (its agent.properties `guid=`)")
    add.add_argument("--vhost", default="/", help="the broker vhost (default: /)")
    add.add_argument("--password", default=None, help="default: a generated one")
    add.add_argument("--queue-type", choices=QUEUE_TYPES, default="quorum",
                     help="the agent's amqp.queue.type: its queue is created to match "
                          "(default: quorum)")
    add.add_argument("--apply", action="store_true",
                     help="run the rabbitmqctl calls here instead of printing them")
    add.set_defaults(handler=_rabbitmq_user_add)


def build_parser() -> argparse.ArgumentParser:
    """Builds the argument parser with every command group."""
    parser = argparse.ArgumentParser(
        prog="hostdev-mgmt", description="hostdev management daemon"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_db_commands(subparsers)
    add_run_command(subparsers)
    add_rabbitmq_user_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` and runs the chosen command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.handler(args)
    except MgmtError as exc:
        print(f"hostdev-mgmt: {exc}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
