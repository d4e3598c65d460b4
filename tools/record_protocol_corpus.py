"""Records one body of every message type as this release encodes it, for upgrade tests.

Writes ``tests/data/protocol-v<N>/<Type>.json`` (``N`` the protocol major
version): the exact bytes ``hostdev.messages.codec.encode`` produces for an
example of each type with every field set (``tests.support.message_strategies``).
The files are committed once and never rewritten: they are what agents,
management and clients of this release put on the wire, and
``tests/unit/messages/test_protocol_corpus.py`` decodes them with the current
code, so a change that would refuse an older sender's message fails there.

A message type added later within the same major version is recorded by
running this again: it writes the files that are missing and leaves every
existing one as it is (``--check`` only lists what is missing).

Run: ``.venv/bin/python tools/record_protocol_corpus.py [--check]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hostdev.messages.base import PROTOCOL_VERSION
from hostdev.messages.codec import MESSAGE_TYPES, encode

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / f"protocol-v{PROTOCOL_VERSION}"


def missing_types(corpus: Path = CORPUS) -> list[str]:
    """Returns the message types of the current protocol without a recorded body."""
    return sorted(name for name in MESSAGE_TYPES if not (corpus / f"{name}.json").exists())


def record(corpus: Path = CORPUS) -> list[Path]:
    """Writes the body of each message type not recorded yet; returns the files written."""
    sys.path.insert(0, str(ROOT))  # tests.support, when run as a script
    from tests.support.message_strategies import example_message

    corpus.mkdir(parents=True, exist_ok=True)
    written = []
    for name in missing_types(corpus):
        path = corpus / f"{name}.json"
        path.write_bytes(encode(example_message(MESSAGE_TYPES[name])) + b"\n")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Records the missing bodies (or, with ``--check``, lists them); returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true",
                        help="list the types without a recorded body; exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        missing = missing_types()
        for name in missing:
            print(f"{CORPUS.relative_to(ROOT)}/{name}.json: not recorded")
        return 1 if missing else 0
    for path in record():
        print(f"recorded {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
