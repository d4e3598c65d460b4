"""The ``hostdev`` operator CLI: one ``argparse`` subcommand per noun.

How to add a subcommand (``hosts``, ``devices``, ``vm ...``, ``job ...``):
write, next to the code it drives, a function
``add_<noun>_command(subparsers) -> None`` that calls
``subparsers.add_parser(...)`` (nested ``add_subparsers`` for verbs such as
``vm deploy``) and ends with ``parser.set_defaults(func=<fn>)``, where
``<fn>(args: argparse.Namespace) -> int`` returns the exit status. Then append
it to ``COMMANDS`` below (``operator_commands.add_commands`` follows this
shape). This module only wires parsers together and turns the package root
errors into a one-line message and an exit status; it holds no command logic:
the operator commands live in ``operator_commands``, ``job_commands`` and
``migration_commands``, what they share in ``plumbing``, and ``hostdev
schema`` in ``hostdev.messages.schema_export``. Only an entry point configures
logging: commands that talk to the broker do it as they start (``plumbing.command``);
``hostdev schema`` does not log.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from hostdev.messages.errors import MessageError
from hostdev.messages.schema_export import add_schema_command
from hostdev.mgmt.cli.operator_commands import add_commands as add_operator_commands

if TYPE_CHECKING:  # argparse's action class is generic only to type checkers
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

#: Registration functions, one per top-level subcommand, in ``--help`` order.
COMMANDS: list[Callable[[SubParsers], None]] = [
    add_schema_command,
    add_operator_commands,
]

#: Entry-point group of subcommands that live outside ``hostdev.mgmt``.
PLUGIN_GROUP = "hostdev.cli"

#: Exit status when a command fails with one of the package root errors.
EXIT_FAILURE = 1
#: Exit status for a usage error (argparse uses the same).
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """Builds the ``hostdev`` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="hostdev",
        description="Operate hostdev: PCI passthrough for KVM clouds, driven over AMQP.",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    # Commands from other parts of the distribution (``hostdev demo`` runs the
    # agent and management together) register through an entry point, so this
    # module never imports the agent: management and agent stay apart.
    for plugin in entry_points(group=PLUGIN_GROUP):
        plugin.load()(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``hostdev`` command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:  # no subcommand, or a group such as ``vm`` without its verb
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return func(args)
    except MessageError as exc:
        sys.stderr.write(f"hostdev: {exc}\n")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
