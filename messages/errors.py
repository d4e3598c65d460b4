"""Errors of the protocol layer; every one says what, where and what was expected."""

from __future__ import annotations


class MessageError(Exception):
    """Root of every error raised by ``hostdev.messages``."""


class PciAddressError(MessageError, ValueError):
    """A PCI address string is malformed; the message names the wrong part."""


class DecodeError(MessageError):
    """A message body could not be decoded into a known message.

    Attributes:
        message_type: the ``type`` the body claimed, when it got that far.
        field: the offending field path (``$.vm.uuid``), when known.
    """

    def __init__(self, reason: str, *, message_type: str | None = None,
                 field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message_type = message_type
        self.field = field


class MalformedBodyError(DecodeError):
    """The body is not a JSON object."""


class UnknownTypeError(DecodeError):
    """The ``type`` field names no message of this protocol."""


class UnsupportedVersionError(DecodeError):
    """The ``v`` field's major version is not one this build speaks."""


class InvalidFieldError(DecodeError):
    """A field is missing, unknown, or of the wrong type or value."""


class BusError(MessageError):
    """The AMQP bus failed in a way the caller must know about."""


class RequestTimeout(BusError, TimeoutError):
    """A request got no answer before its timeout."""


class RemoteError(BusError):
    """The peer answered a request with an error."""

    def __init__(self, reason: str, *, code: str = "error") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class TransientError(MessageError):
    """A handler failed for a reason that may pass (database or broker hiccup).

    The bus requeues the message; after the queue's delivery limit it is
    dead-lettered like any other failure.
    """
