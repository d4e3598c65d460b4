"""Registers ``hostdev demo`` with the operator CLI (entry point ``hostdev.cli``)."""

from __future__ import annotations

import argparse
from typing import Any


def _run(args: argparse.Namespace) -> int:
    from hostdev.demo.runner import run_demo  # the demo imports libvirt: load it lazily

    return run_demo(args)


def add_demo_command(subparsers: Any) -> None:
    """Adds ``hostdev demo``."""
    parser = subparsers.add_parser(
        "demo", help="run the all-in-one demo (management + simulated hosts)")
    parser.add_argument("--amqp-url", default=None,
                        help="run on a real broker instead of the in-process bus")
    parser.add_argument("--db-url", default=None,
                        help="run on this database instead of a temporary SQLite file")
    parser.set_defaults(func=_run)
