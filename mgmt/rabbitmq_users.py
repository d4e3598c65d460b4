"""Per-agent RabbitMQ users: the recipe that lets ``agent-<guid>`` speak only for itself.

Each agent connects as its own broker user. Its permissions let it configure
and read only its own queue, and its topic permissions on
``hostdev.commands`` let it publish only routing keys ``mgmt.<guid>.*``. The
broker also checks the AMQP ``user_id`` property against the login, and
management refuses a message whose ``user_id`` does not match the host it
speaks for: a compromised host cannot impersonate another.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass

from hostdev.messages.bus.contract import COMMANDS_EXCHANGE
from hostdev.mgmt.errors import MgmtError

_GUID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class AgentUserRecipe:
    """The broker objects of one agent user, as ``rabbitmqctl`` argument lists."""

    guid: str
    vhost: str
    password: str

    @property
    def user(self) -> str:
        """The broker user name, ``agent-<guid>``."""
        return f"agent-{self.guid}"

    def commands(self) -> list[list[str]]:
        """The ``rabbitmqctl`` calls that create the user and its permissions, in order."""
        guid = re.escape(self.guid)
        queue = re.escape(f"hostdev.agent.{self.guid}")
        own = f"^{queue}$"
        write = f"^({queue}|hostdev\\.commands|hostdev\\.dead)$"
        read = f"^({queue}|hostdev\\.commands)$"
        return [
            ["add_user", self.user, self.password],
            # configure: only its own queue; write: bind it (queue), publish
            # (exchange) and name hostdev.dead as its dead-letter exchange;
            # read: consume its queue and bind from the exchange.
            ["set_permissions", "-p", self.vhost, self.user, own, write, read],
            # Topic permissions: publish only as itself, bind only its own keys.
            ["set_topic_permissions", "-p", self.vhost, self.user, COMMANDS_EXCHANGE,
             f"^mgmt\\.{guid}\\.", f"^agent\\.{guid}\\."],
        ]

    def shell(self) -> str:
        """The recipe as shell lines an operator can read and run."""
        lines = []
        for argv in self.commands():
            lines.append("rabbitmqctl " + " ".join(_quote(arg) for arg in argv))
        return "\n".join(lines)


def _quote(arg: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./:@=-]+", arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"


def agent_user_recipe(guid: str, *, vhost: str = "/", password: str | None = None
                      ) -> AgentUserRecipe:
    """Builds the recipe for one agent; a password is generated when none is given.

    Raises:
        MgmtError: the guid is not a plain identifier (it becomes part of names and regexes).
    """
    if not _GUID.match(guid):
        raise MgmtError(f"agent guid {guid!r} is not valid: expected 1-64 characters of "
                        "letters, digits, '_', '.' and '-', starting with a letter or digit")
    return AgentUserRecipe(guid=guid, vhost=vhost,
                           password=password or secrets.token_urlsafe(24))


def apply_recipe(recipe: AgentUserRecipe, rabbitmqctl: str = "rabbitmqctl") -> None:
    """Runs the recipe's ``rabbitmqctl`` calls on this machine's broker.

    Raises:
        MgmtError: rabbitmqctl is missing or one call failed (its output is included).
    """
    binary = shutil.which(rabbitmqctl)
    if binary is None:
        raise MgmtError(f"{rabbitmqctl} not found: run `hostdev-mgmt rabbitmq-user add GUID` "
                        "without --apply and run the printed commands on a broker node")
    for argv in recipe.commands():
        result = subprocess.run([binary, "-q", *argv], capture_output=True, text=True,
                                check=False)
        if result.returncode != 0:
            raise MgmtError(f"rabbitmqctl {argv[0]} failed for {recipe.user}: "
                            f"{(result.stderr or result.stdout).strip()}")
