"""Errors of the management daemon; every one says what, where and what to do.

Each error carries a machine-readable ``code`` that the API layer copies into
``ErrorAnswer.code`` so clients can tell a refusal from a failure.
"""

from __future__ import annotations


class MgmtError(Exception):
    """Root of every error raised by ``hostdev.mgmt``."""

    code: str = "internal"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(MgmtError, ValueError):
    """``mgmt.properties`` holds a value that cannot be used; names file and line."""

    code = "invalid"


class InvalidRequest(MgmtError, ValueError):
    """A request or an offering is malformed; the text names the bad part."""

    code = "invalid"


class NotFound(MgmtError, LookupError):
    """A host, VM, offering, device or job named in a request does not exist."""

    code = "not_found"


class Conflict(MgmtError):
    """The request is valid but the current state forbids it (try again later)."""

    code = "conflict"


class InvalidTransition(Conflict):
    """A VM event is not allowed in the VM's current state."""


class NoCapacity(Conflict):
    """No host can take the request; the text says why each host was refused."""

    code = "no_capacity"


class Forbidden(MgmtError):
    """A sender spoke for a host it is not (broker ``user_id`` mismatch)."""

    code = "forbidden"


class ForgedAnswer(Forbidden):
    """An answer names no command awaiting it, or comes from a host its command did not go to."""


class NotImplementedYet(MgmtError):
    """The request names a feature a later release adds."""

    code = "not_implemented"
