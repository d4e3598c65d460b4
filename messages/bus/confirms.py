"""Bookkeeping of publisher confirms in flight and of acks that wait for them.

A channel in confirm mode numbers its publishes 1, 2, 3 ...; the broker acks
(or nacks) them, possibly several at once (``multiple``). The window keeps
every unconfirmed publish so it can be republished after a nack or a lost
connection, and holds back the ack of a consumed message until everything its
handler published is confirmed: an answer is never lost between handler and
ack. Pure bookkeeping, no I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Unconfirmed:
    """One publish the broker has not confirmed yet."""

    exchange: str
    routing_key: str
    message: Any  # the transport's message object, republished as is
    mandatory: bool
    message_id: str
    nacks: int = 0
    #: False for answers over direct reply-to: their request is redelivered and
    #: answered again, and resending to a reply_to the broker rejects would only
    #: kill the new connection too.
    republish: bool = True
    #: Called once the broker confirmed it (after any republish); never for
    #: one refused for good or not republished. Must neither block nor raise.
    on_confirmed: Callable[[], None] | None = None


class ConfirmWindow:
    """Publishes in flight on one confirm-mode channel, by sequence number."""

    def __init__(self) -> None:
        self.seq = 0
        self.pending: dict[int, Unconfirmed] = {}
        self._deferred: deque[tuple[int, Any]] = deque()

    def __len__(self) -> int:
        return len(self.pending)

    def published(self, item: Unconfirmed) -> int:
        """Records a publish just sent; returns its sequence number."""
        self.seq += 1
        self.pending[self.seq] = item
        return self.seq

    def acked(self, tag: int, multiple: bool) -> None:
        """Forgets publishes the broker confirmed, calling their ``on_confirmed``."""
        if not multiple:
            item = self.pending.pop(tag, None)
            if item is not None and item.on_confirmed is not None:
                item.on_confirmed()
            return
        pending = self.pending
        while pending:
            first = next(iter(pending))
            if first > tag:
                break
            item = pending.pop(first)
            if item.on_confirmed is not None:
                item.on_confirmed()

    def nacked(self, tag: int, multiple: bool) -> list[Unconfirmed]:
        """Removes and returns publishes the broker refused (to republish them)."""
        if not multiple:
            item = self.pending.pop(tag, None)
            return [item] if item else []
        refused = [seq for seq in self.pending if seq <= tag]
        return [self.pending.pop(seq) for seq in refused]

    def confirmed_upto(self, seq: int) -> bool:
        """Tells whether every publish numbered ``seq`` or lower is confirmed."""
        return not self.pending or next(iter(self.pending)) > seq

    def defer(self, item: Any) -> None:
        """Holds ``item`` (e.g. a delivery tag to ack) until all publishes so far are confirmed."""
        self._deferred.append((self.seq, item))

    def hold_back_deferred(self) -> None:
        """Makes every held item wait for publishes made from now on (after a republish)."""
        self._deferred = deque((self.seq, item) for _, item in self._deferred)

    def ready(self) -> list[Any]:
        """Pops the held items whose publishes are all confirmed, oldest first."""
        out = []
        deferred = self._deferred
        while deferred and self.confirmed_upto(deferred[0][0]):
            out.append(deferred.popleft()[1])
        return out

    def reset(self) -> list[Unconfirmed]:
        """Starts a new channel: returns the unconfirmed publishes in order, drops held items.

        Held items belong to the old channel (their deliveries are redelivered
        by the broker), so they are discarded.
        """
        items = list(self.pending.values())
        self.pending.clear()
        self._deferred.clear()
        self.seq = 0
        return items
