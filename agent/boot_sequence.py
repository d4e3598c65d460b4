"""The agent's boot id and the one sequence its reports and answers are numbered in.

Management orders what a host says by this number instead of by the time it
arrives: a ping taken before a ``StartAnswer`` and delivered after it (a
broker backlog, a redelivery) has a lower number and changes nothing about
that VM. The boot id is random per process start, so a restarted agent starts
a new sequence at 1 and management knows to start over with it.

Where the number is taken matters: a report takes its number *before* it
reads libvirt and an answer takes its number *after* its work is done. A
report numbered above an answer therefore looked at libvirt after the work
the answer describes; a report that might have looked before it is numbered
below and is not applied to that VM (the next one is).
"""

from __future__ import annotations

import itertools
import threading
import uuid
from typing import TypeVar

import msgspec

from hostdev.messages.commands import (
    AttachPciDevicesAnswer,
    DetachPciDevicesAnswer,
    MigrateAnswer,
    StartAnswer,
    StopAnswer,
)

#: The answers that carry ``boot_id`` and ``seq``.
StampedAnswer = (StartAnswer, StopAnswer, MigrateAnswer, AttachPciDevicesAnswer,
                 DetachPciDevicesAnswer)

_M = TypeVar("_M")


class BootSequence:
    """Hands out the numbers of one agent process, from 1, to any thread."""

    def __init__(self, boot_id: str | None = None) -> None:
        self.boot_id: str = boot_id or uuid.uuid4().hex
        self._numbers = itertools.count(1)
        # Answers of long commands are numbered on their worker threads.
        self._lock = threading.Lock()

    def take(self) -> int:
        """Returns the next number of this boot's sequence."""
        with self._lock:
            return next(self._numbers)

    def stamp(self, message: _M) -> _M:
        """Returns an answer numbered now (after its work); any other message as it is."""
        if isinstance(message, StampedAnswer):
            return msgspec.structs.replace(message, boot_id=self.boot_id, seq=self.take())
        return message
