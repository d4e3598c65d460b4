"""The base of every message: a frozen, strict, self-describing struct."""

from __future__ import annotations

from typing import ClassVar, Literal

import msgspec

from hostdev.messages.limits import Details

#: The protocol's major version; a body with another ``v`` is refused.
PROTOCOL_VERSION = 1

PowerState = Literal["running", "paused", "stopped", "crashed", "unknown"]
Result = Literal["ok", "error"]


class Message(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="type",
    tag=True,
):
    """A protocol message; its JSON ``type`` is the class name.

    Every message MUST be immutable and carry ``v`` (the protocol major
    version) so a receiver can refuse a body it does not understand.
    """

    #: How the message is delivered: ``command`` (to one agent or to mgmt),
    #: ``answer``, ``event`` or ``api`` (request/response).
    kind: ClassVar[str] = "command"

    v: int = PROTOCOL_VERSION


class Value(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A structured value nested inside messages (never sent on its own)."""


class Answer(Message, frozen=True, kw_only=True):
    """The typed answer to a command: outcome, details, and the command's own data.

    ``result`` is ``ok`` or ``error``; ``details`` says why in words a person
    understands. The command's ``message_id`` travels as the AMQP
    ``correlation_id``.
    """

    kind: ClassVar[str] = "answer"

    result: Result = "ok"
    details: Details = ""

    @property
    def ok(self) -> bool:
        """True when the command succeeded."""
        return self.result == "ok"
