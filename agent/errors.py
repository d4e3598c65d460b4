"""Errors of the host agent; each says what was wrong, where, and what to do."""

from __future__ import annotations

from hostdev.messages.pci_address import PciAddress
from hostdev.messages.runtime.properties import PropertiesError


class AgentError(Exception):
    """Root of every error raised by ``hostdev.agent``."""


class ConfigError(AgentError, PropertiesError):
    """A value in ``agent.properties`` is wrong; names file, line, text and expectation.

    Attributes (from ``PropertiesError``):
        path: the configuration file.
        line: the line of the offending entry (0 when the file itself is the problem).
        text: the offending text.
        expected: what would have been accepted.
    """


class HypervisorError(AgentError):
    """A hypervisor operation failed; carries the operation and libvirt's code.

    Attributes:
        operation: what was attempted (``lookup``, ``define``, ``start``...).
        reason: libvirt's message.
        code: libvirt's error code, when libvirt raised it.
        transient: True when trying again later may succeed (libvirt's
            connection or the host's resources failed); False when the same
            command would fail the same way (an invalid argument, no such
            domain), so it is answered as an error at once.
    """

    def __init__(self, operation: str, reason: str, *, code: int | None = None,
                 transient: bool = True) -> None:
        super().__init__(f"{operation} failed: {reason}" + (f" (libvirt code {code})"
                                                              if code is not None else ""))
        self.operation = operation
        self.reason = reason
        self.code = code
        self.transient = transient


class DomainNotFound(HypervisorError):
    """No domain with that UUID is defined on this host."""

    def __init__(self, uuid: str) -> None:
        super().__init__("lookup", f"no domain with UUID {uuid} on this host", transient=False)
        self.uuid = uuid


class DetachRefused(HypervisorError):
    """The guest did not release a device in time; the device stays attached.

    A hypervisor raising it MUST leave the device attached both live and in the
    persistent configuration, so a rollback only has to re-attach the others.
    """

    def __init__(self, uuid: str, address: PciAddress, timeout_s: float) -> None:
        super().__init__(
            "detach",
            f"the guest of domain {uuid} did not release {address} within {timeout_s:g} s "
            "(a guest without PCI hot-plug support, e.g. no acpiphp, ignores the unplug)",
        )
        self.uuid = uuid
        self.address = address
        self.timeout_s = timeout_s


class MigrationFailed(HypervisorError):
    """A live migration failed or was aborted; the domain still runs on the source."""

    def __init__(self, uuid: str, destination_uri: str, reason: str) -> None:
        super().__init__("migrate", f"domain {uuid} to {destination_uri}: {reason}")
        self.uuid = uuid
        self.destination_uri = destination_uri


class StartupCheckError(AgentError):
    """The host does not match the configuration (a listed device is missing)."""


class SenderRefused(AgentError):
    """A message reached the agent from where no command to it may come.

    The bus dead-letters it and, for a command, answers an ``ErrorAnswer`` with
    ``code`` ``forbidden`` (the bus copies the code from the error).
    """

    code = "forbidden"
