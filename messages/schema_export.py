"""JSON Schema export of every message, and the ``hostdev schema`` command.

The schemas are generated from the message types (``codec.json_schema``) and
committed under ``messages/schema/``: one ``<Type>.json`` per message plus
``AnyMessage.json`` for the tagged union, so tools in other languages can
validate what they send. ``make schema`` regenerates them; a unit test fails
when the committed files drift from the code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from hostdev.messages.codec import MESSAGE_TYPES, json_schema

#: Where the committed schemas live (inside the package, shipped as package data).
SCHEMA_DIR = Path(__file__).resolve().parent / "schema"

#: The file name (without ``.json``) of the union of every message.
UNION_NAME = "AnyMessage"

_REGENERATE = "run `make schema` (or `hostdev schema --write messages/schema`) and commit"


def schema_names() -> list[str]:
    """Returns every schema name: each message type, sorted, then the union."""
    return [*sorted(MESSAGE_TYPES), UNION_NAME]


def schema_text(name: str | None = None) -> str:
    """Returns the JSON Schema of one message (or of the union) as the committed text.

    Args:
        name: a message type such as ``StartCommand``; ``None`` or ``AnyMessage``
            for the union of every message.

    Raises:
        UnknownTypeError: ``name`` is not a message type.
    """
    schema = json_schema(None if name in (None, UNION_NAME) else name)
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def write_schemas(directory: str | Path) -> list[Path]:
    """Writes every schema into ``directory`` and removes schema files of vanished messages.

    Returns:
        The files written, in ``schema_names()`` order.
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    wanted = {f"{name}.json" for name in schema_names()}
    for old in target.glob("*.json"):
        if old.name not in wanted:
            old.unlink()
    written = []
    for name in schema_names():
        path = target / f"{name}.json"
        text = schema_text(name)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale_schemas(directory: str | Path = SCHEMA_DIR) -> list[str]:
    """Lists how the schema files in ``directory`` differ from the code (empty when current).

    Each entry names a file and says whether it is missing, outdated or extra.
    """
    target = Path(directory)
    problems = []
    for name in schema_names():
        path = target / f"{name}.json"
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.read_text(encoding="utf-8") != schema_text(name):
            problems.append(f"{path}: differs from the message types")
    wanted = {f"{name}.json" for name in schema_names()}
    problems.extend(
        f"{extra}: no such message any more"
        for extra in sorted(target.glob("*.json"))
        if extra.name not in wanted
    )
    return problems


def add_schema_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Registers ``hostdev schema [NAME] [--list | --write DIR | --check DIR]``."""
    parser = subparsers.add_parser(
        "schema",
        help="print or write the JSON Schema of the protocol's messages",
        description="Prints the JSON Schema of one message, or of the union of every "
        "message when NAME is omitted; or writes/checks one file per message.",
    )
    parser.add_argument(
        "name", nargs="?", metavar="NAME",
        help=f"a message type such as StartCommand (default: {UNION_NAME}, the union)",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="list the schema names")
    action.add_argument(
        "--write", metavar="DIR", type=Path,
        help="write <Type>.json for every message and AnyMessage.json into DIR",
    )
    action.add_argument(
        "--check", metavar="DIR", type=Path,
        help="exit 1 when the schema files in DIR differ from the code",
    )
    parser.set_defaults(func=run_schema_command)


def run_schema_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Runs ``hostdev schema`` with parsed ``args``; returns the exit status."""
    stream = out if out is not None else sys.stdout
    if args.name is not None and (args.write or args.check or args.list):
        sys.stderr.write(
            "hostdev schema: NAME cannot be combined with --list, --write or --check\n"
        )
        return 2
    if args.list:
        stream.write("".join(f"{name}\n" for name in schema_names()))
    elif args.write is not None:
        written = write_schemas(args.write)
        stream.write(f"wrote {len(written)} schema files to {args.write}\n")
    elif args.check is not None:
        problems = stale_schemas(args.check)
        if problems:
            stream.write("".join(f"{problem}\n" for problem in problems))
            stream.write(f"schemas are out of date: {_REGENERATE}\n")
            return 1
        stream.write(f"{len(schema_names())} schema files in {args.check} are current\n")
    else:
        stream.write(schema_text(args.name))
    return 0
