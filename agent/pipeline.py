"""The agent's message pipeline: every delivery on its queue takes the same steps.

Declared once, in the order management's pipeline uses:

1. bind the log context: ``message_id``, ``correlation_id``, ``host``, ``vm``;
2. check the sender: the agent takes messages only on its own routing keys
   (``agent.<guid>.<Type>``), and a ``user_id`` that is an agent's
   (``agent-<guid>``) must be this agent's: agents never command each other;
3. de-duplicate by ``message_id``: management's outbox publishes at least
   once, so a repeat is answered with the first answer, not run again
   (``hostdev.agent.recent_commands``);
4. run the handler, on the loop thread or, for long commands, on a worker
   (``hostdev.agent.background``), timed in
   ``hostdev_agent_command_duration_seconds``; its answer is numbered in the
   agent's sequence as soon as the work is done (``hostdev.agent.boot_sequence``);
5. map errors to answers: a handler answers its outcomes itself
   (``result="error"`` with details); libvirt failing under it becomes
   ``TransientError``, which the bus redelivers and, past the delivery limit,
   dead-letters with an ``ErrorAnswer``; a refused sender is ``SenderRefused``,
   dead-lettered with an ``ErrorAnswer`` whose ``code`` is ``forbidden``. No
   exception crosses the bus as anything but a typed answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import structlog

from hostdev.agent.background import BackgroundCommands
from hostdev.agent.boot_sequence import BootSequence
from hostdev.agent.errors import HypervisorError, SenderRefused
from hostdev.agent.handlers import failure_answer
from hostdev.agent.metrics import timed
from hostdev.agent.recent_commands import RecentCommands
from hostdev.messages.base import Message
from hostdev.messages.bus.contract import Handler, Incoming
from hostdev.messages.errors import TransientError
from hostdev.messages.runtime.logging import bound_message

log = structlog.get_logger()

_AGENT_USER = re.compile(r"agent-(?P<guid>.+)")

#: The step that does the work: the typed message and its delivery, to an answer or None.
Step = Callable[[Any, Incoming], "Message | None"]


def check_sender(guid: str, incoming: Incoming) -> None:
    """Refuses a message that did not come the way commands to agent ``guid`` come.

    Raises:
        SenderRefused: the routing key is not ``agent.<guid>.<Type>``, or the
            broker-validated ``user_id`` is another agent's.
    """
    words = incoming.routing_key.split(".")
    if len(words) < 3 or words[0] != "agent" or words[1] != guid:
        raise SenderRefused(
            f"message {incoming.message_id} came with routing key {incoming.routing_key!r}; "
            f"agent {guid} takes messages only on agent.{guid}.<Type>")
    match = _AGENT_USER.fullmatch(incoming.user_id or "")
    if match is not None and match["guid"] != guid:
        raise SenderRefused(
            f"message {incoming.message_id} was sent by broker user {incoming.user_id}, "
            f"another agent; only management sends to agent {guid}")


def _vm_of(message: Any) -> str | None:
    vm = getattr(message, "vm_uuid", None) or getattr(getattr(message, "vm", None), "uuid", None)
    return vm if isinstance(vm, str) else None


class CommandPipeline:
    """Builds the bus handlers of one agent, each taking the steps above."""

    def __init__(self, guid: str, recent: RecentCommands, background: BackgroundCommands,
                 sequence: BootSequence) -> None:
        self.guid = guid
        self.recent = recent
        self.background = background
        self.sequence = sequence

    def command(self, run: Callable[[Any], Message]) -> Handler:
        """Returns the handler of a command answered on the loop thread."""
        observed = timed(run)
        # Numbered once the work is done (hostdev.agent.boot_sequence).
        return self._handler(lambda message, _incoming: self.sequence.stamp(observed(message)))

    def long_command(self, run: Callable[[Any], Message], key: Callable[[Any], str]) -> Handler:
        """Returns the handler of a command run on a worker thread, one per ``key``."""
        observed = timed(run)
        # Numbered on the worker, as soon as the work is done.
        return self._handler(self.background.runner(
            lambda message: self.sequence.stamp(observed(message)), key))

    def answer(self, run: Callable[[Any], None]) -> Handler:
        """Returns the handler of an answer from management (nothing to answer back)."""
        return self._handler(lambda message, _incoming: run(message))

    def _handler(self, step: Step) -> Handler:
        def handle(message: Any, incoming: Incoming) -> Message | None:
            kind = type(message).__name__
            with bound_message(incoming.message_id, incoming.correlation_id, host=self.guid,
                               vm=_vm_of(message)):
                log.info("command_received", type=kind, redelivered=incoming.redelivered)
                check_sender(self.guid, incoming)
                previous = self.recent.answer_of(incoming.message_id)
                if previous is not None:
                    log.info("command_repeated", type=kind,
                             hint="answered as the first time, not run again")
                    return previous
                try:
                    answer = step(message, incoming)
                except HypervisorError as exc:
                    if exc.transient:  # libvirt itself failed (connection lost...): later
                        raise TransientError(f"{kind}: {exc}") from exc
                    # Retrying would fail the same way: say so now, once.
                    log.warning("command_failed_permanently", type=kind, error=str(exc))
                    answer = self.sequence.stamp(
                        failure_answer(message, _vm_of(message) or "", str(exc)))
                if answer is not None:
                    log.info("command_answered", type=type(answer).__name__,
                             result=getattr(answer, "result", ""))
                    self.recent.remember(incoming.message_id, answer)
                return answer
        return handle
