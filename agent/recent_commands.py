"""The answers to the agent's most recent commands, by message id, to drop repeats.

Management publishes commands through an outbox at least once: a daemon
killed after publishing a command but before marking it published leaves
the row to another daemon, which publishes it again seconds later with the
same message id (``outbox-<row id>``). Running such a repeat is not
harmless: a ``StartCommand`` repeated after the VM was stopped would start
it again behind management's back, holding devices management has freed.
The agent therefore answers a repeated message id with the answer it gave
the first time, without running the command again.

The memory is bounded and lives in the process: a repeat that arrives after
an agent restart runs again (the handlers still check libvirt's state first).
"""

from __future__ import annotations

from collections import OrderedDict

from hostdev.messages.base import Message

#: How many answers are kept; far more than the commands of a stale-outbox window.
DEFAULT_SIZE = 4096


class RecentCommands:
    """Remembers the answer to each of the last ``size`` commands by message id."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if size < 1:
            raise ValueError(f"RecentCommands needs room for at least one answer, not {size}")
        self._size = size
        self._answers: OrderedDict[str, Message] = OrderedDict()

    def answer_of(self, message_id: str | None) -> Message | None:
        """Returns the answer already given to ``message_id``, or None if it is new."""
        if not message_id:
            return None
        return self._answers.get(message_id)

    def remember(self, message_id: str | None, answer: Message) -> None:
        """Records the answer to ``message_id``, forgetting the oldest beyond the size."""
        if not message_id:
            return
        self._answers[message_id] = answer
        self._answers.move_to_end(message_id)
        while len(self._answers) > self._size:
            self._answers.popitem(last=False)

    def __len__(self) -> int:
        return len(self._answers)
