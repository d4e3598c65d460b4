"""Why the broker could not be reached, in one line, and whether trying again can help.

A daemon or the CLI that cannot connect says so in one line naming the URL
(password hidden) and the cause, and gives up at once when the cause is
permanent (a refused login, a missing vhost, a URL that is not AMQP's):
retrying those only floods the broker and the log. A refused or timed-out
connection may be a broker still starting, so start-up retries it a bounded
number of times with backoff (``hostdev.messages.runtime.backoff.retry``).
"""

from __future__ import annotations

import re
import socket
from urllib.parse import urlsplit

import amqp.exceptions

from hostdev.messages.bus.contract import safe_url
from hostdev.messages.errors import BusError

#: URL schemes the bus speaks.
AMQP_SCHEMES = ("amqp", "amqps")

_VHOST_NOT_FOUND = re.compile(r"vhost (?P<vhost>.*) not found")


class BrokerUnreachable(BusError):
    """The broker at a URL could not be connected to; the text is one line for an operator.

    Attributes:
        url: the URL tried, password masked.
        cause: why, in words.
        permanent: True when trying again cannot help (fix the URL, the
            credentials or the vhost first).
    """

    def __init__(self, url: str, cause: str, *, permanent: bool) -> None:
        super().__init__(f"cannot connect to RabbitMQ at {url}: {cause}")
        self.url = url
        self.cause = cause
        self.permanent = permanent


def check_scheme(url: str) -> None:
    """Refuses a URL that is not ``amqp://`` or ``amqps://`` before anything is tried.

    Raises:
        BrokerUnreachable: permanent; names the URL and what is expected.
    """
    scheme = urlsplit(url.strip()).scheme
    if scheme not in AMQP_SCHEMES:
        raise BrokerUnreachable(
            safe_url(url),
            f"scheme {scheme + '://' if scheme else '(none)'} is not AMQP; use "
            "amqp://user:password@host:5672/vhost or amqps://...", permanent=True)


def broker_failure(url: str, exc: BaseException) -> BrokerUnreachable:
    """Returns the one-line failure for an error raised while connecting to ``url``.

    Args:
        url: the URL tried, password masked.
        exc: what the connection attempt raised.
    """
    if isinstance(exc, BrokerUnreachable):
        return exc
    if isinstance(exc, amqp.exceptions.AccessRefused):
        return BrokerUnreachable(url, "login refused (ACCESS_REFUSED): wrong user or password",
                                 permanent=True)
    if isinstance(exc, amqp.exceptions.NotAllowed):
        text = str(getattr(exc, "reply_text", "") or exc)
        found = _VHOST_NOT_FOUND.search(text)
        if found:
            return BrokerUnreachable(
                url, f"vhost {found['vhost']!r} does not exist (NOT_ALLOWED); create it "
                "(rabbitmqctl add_vhost) or fix the URL's vhost", permanent=True)
        return BrokerUnreachable(url, f"not allowed: {text}; the user needs permissions on "
                                 "the vhost (rabbitmqctl set_permissions)", permanent=True)
    if isinstance(exc, ConnectionRefusedError):
        return BrokerUnreachable(url, "connection refused: is RabbitMQ running and listening "
                                 "on that host and port?", permanent=False)
    if isinstance(exc, socket.gaierror):
        return BrokerUnreachable(url, f"unknown host ({exc.strerror})", permanent=False)
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return BrokerUnreachable(url, "no answer in time (a firewall, or not a broker?)",
                                 permanent=False)
    return BrokerUnreachable(url, f"{type(exc).__name__}: {exc}", permanent=False)


def is_transient(exc: Exception) -> bool:
    """True when ``exc`` is a failure to reach the broker that trying again may cure."""
    return isinstance(exc, BrokerUnreachable) and not exc.permanent
