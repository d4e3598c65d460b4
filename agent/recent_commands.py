"""The answers to the agent's most recent commands, by message id, to drop repeats.

Management publishes commands through an outbox at least once: a daemon
killed after publishing a command but before marking it published leaves
the row to another daemon, which publishes it again seconds later with the
same message id. Running such a repeat is not harmless: a ``StartCommand``
repeated after the VM was stopped would start it again behind management's
back, holding devices management has freed. The agent therefore answers a
repeated message id with the answer it gave the first time, without running
the command again.

The memory survives a restart of the agent: with a ``path`` (the file
``recent-commands.json`` in the agent's ``state.dir``), each new answer is
appended to it as one line of JSON and flushed to the disk before
``remember`` returns, so the answer is on disk before it is published, and
the file is read back at start. A repeat that arrives right after a restart
is answered as the first time. Appending one line costs a fraction of
rewriting hundreds of answers after every command; once the file holds twice
``persisted`` answers it is rewritten with the most recent ``persisted`` (to
a temporary file, then renamed over the old one, so a crash leaves the old
file or the new one, never half of one). A crash in the middle of an append
leaves its line cut short: that answer was never published (``remember`` had
not returned), and the cut line is dropped when the file is read. A file
that cannot be read or written is logged with its path and the memory goes
on in the process: it never stops the agent.

The file: a first line ``{"version":2}``, then one ``{"id":..,"answer":..}``
per answer, oldest first. A version 1 file (one JSON document) is read too.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import msgspec
import structlog

from hostdev.messages.base import Message
from hostdev.messages.codec import decode, encode
from hostdev.messages.errors import MessageError

log = structlog.get_logger()

#: How many answers are kept; far more than the commands of a stale-outbox window.
DEFAULT_SIZE = 4096
#: How many of them are written to the state file (the file stays well under a few MB).
DEFAULT_PERSISTED = 512
#: The file's format; a file of another version is ignored (version 1 is still read).
FILE_VERSION = 2
FILE_NAME = "recent-commands.json"
_HEADER = b'{"version":%d}\n' % FILE_VERSION


class _Entry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    answer: msgspec.Raw


class _Header(msgspec.Struct, frozen=True):
    version: int


class _File(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A version 1 file: every answer in one document, rewritten after each."""

    version: int
    answers: list[_Entry]


def _line(message_id: str, encoded: bytes) -> bytes:
    return msgspec.json.encode(_Entry(id=message_id, answer=msgspec.Raw(encoded))) + b"\n"


def _entries(raw: bytes) -> tuple[list[_Entry], bool]:
    """Returns the answers of a file, oldest first, and whether it must be rewritten.

    Raises:
        msgspec.DecodeError, ValueError: the file is not one this agent wrote.
    """
    lines = raw.split(b"\n")
    version = msgspec.json.decode(lines[0], type=_Header).version
    if version == 1:
        return msgspec.json.decode(raw, type=_File).answers, True
    if version != FILE_VERSION:
        raise ValueError(f"version {version}, expected {FILE_VERSION}")
    # After the last newline: nothing, or an append a crash cut short.
    *whole, cut = lines[1:]
    return [msgspec.json.decode(line, type=_Entry) for line in whole], bool(cut)


class RecentCommands:
    """Remembers the answer to each of the last ``size`` commands by message id."""

    def __init__(self, size: int = DEFAULT_SIZE, *, path: str | Path | None = None,
                 persisted: int = DEFAULT_PERSISTED) -> None:
        """Prepares the memory; with ``path``, loads the answers a previous run wrote there.

        Args:
            size: how many answers are kept in memory.
            path: the state file, or None to keep the memory in the process only.
            persisted: how many of the most recent answers the file keeps.
        """
        if size < 1:
            raise ValueError(f"RecentCommands needs room for at least one answer, not {size}")
        self._size = size
        self._persisted = max(1, min(persisted, size))
        self._path = Path(path) if path is not None else None
        # Each answer with its encoding: the state file is rewritten after every
        # new answer, and re-encoding hundreds of answers each time is waste.
        self._answers: OrderedDict[str, tuple[Message, bytes]] = OrderedDict()
        #: Answers in the file, or None when it must be rewritten before the next append.
        self._in_file: int | None = None
        if self._path is not None:
            self._load(self._path)

    def answer_of(self, message_id: str | None) -> Message | None:
        """Returns the answer already given to ``message_id``, or None if it is new."""
        if not message_id:
            return None
        kept = self._answers.get(message_id)
        return kept[0] if kept is not None else None

    def remember(self, message_id: str | None, answer: Message) -> None:
        """Records the answer to ``message_id``, forgetting the oldest beyond the size.

        With a path, the answer is on disk before this returns, so before it is
        published.
        """
        if not message_id:
            return
        self._answers[message_id] = (answer, encode(answer) if self._path is not None else b"")
        self._answers.move_to_end(message_id)
        while len(self._answers) > self._size:
            self._answers.popitem(last=False)
        if self._path is not None:
            self._save(self._path, message_id)

    def __len__(self) -> int:
        return len(self._answers)

    # -- the state file -------------------------------------------------------------

    def _load(self, path: Path) -> None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("recent_commands_unreadable", path=str(path), error=str(exc),
                      hint="repeats of commands answered before this start run again")
            return
        try:
            entries, rewrite = _entries(raw)
            answers = [(entry.id, (decode(body), body))
                       for entry in entries for body in (bytes(entry.answer),)]
        except (msgspec.DecodeError, MessageError, ValueError) as exc:
            log.error("recent_commands_corrupt", path=str(path), error=str(exc)[:200],
                      hint="the file is ignored and replaced by the next answer; repeats of "
                           "commands answered before this start run again")
            return
        for message_id, kept in answers:
            self._answers[message_id] = kept
            self._answers.move_to_end(message_id)
        while len(self._answers) > self._persisted:
            self._answers.popitem(last=False)
        self._in_file = None if rewrite else len(answers)
        log.info("recent_commands_loaded", path=str(path), answers=len(self._answers))

    def _save(self, path: Path, message_id: str) -> None:
        try:
            if self._in_file is None or self._in_file >= 2 * self._persisted:
                self._rewrite(path)
            else:
                self._append(path, _line(message_id, self._answers[message_id][1]))
        except OSError as exc:
            self._in_file = None  # a line may be half written: rewrite before appending
            log.error("recent_commands_not_saved", path=str(path), error=str(exc),
                      hint="the answers are kept in memory; a restart forgets them")

    def _append(self, path: Path, line: bytes) -> None:
        handle = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(handle, line)
            os.fdatasync(handle)
        finally:
            os.close(handle)
        self._in_file = (self._in_file or 0) + 1

    def _rewrite(self, path: Path) -> None:
        newest = list(itertools.islice(reversed(self._answers.items()), self._persisted))
        body = _HEADER + b"".join(_line(message_id, encoded)
                                  for message_id, (_, encoded) in reversed(newest))
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(body)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self._in_file = len(newest)
