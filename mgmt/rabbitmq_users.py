"""Per-agent RabbitMQ users: the recipe that lets ``agent-<guid>`` speak only for itself.

Each agent connects as its own broker user. Its permissions let it configure
and read only its own queue, and its topic permissions on
``hostdev.commands`` let it publish only routing keys ``mgmt.<guid>.*``. The
broker also checks the AMQP ``user_id`` property against the login, and
management refuses a message whose ``user_id`` does not match the host it
speaks for: a compromised host cannot impersonate another.

It may not write to ``hostdev.dead``, so it cannot add a dead letter claiming
any origin. The broker still dead-letters its queue's messages (delivery
limit, rejection) there, as the broker, with ``x-death`` naming the queue.
Declaring a queue with a dead-letter exchange takes write permission on that
exchange, though, so the recipe creates the agent's queue itself (through
``rabbitmqctl import_definitions``); the agent re-declaring an existing queue
with the same arguments needs no such permission.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass

from hostdev.messages.bus.contract import (
    COMMANDS_EXCHANGE,
    DEAD_EXCHANGE,
    QUEUE_TYPES,
    BusConfig,
    queue_arguments,
)
from hostdev.messages.limits import GUID_PATTERN
from hostdev.mgmt.errors import MgmtError


@dataclass(frozen=True)
class AgentUserRecipe:
    """The broker objects of one agent user, as ``rabbitmqctl`` argument lists."""

    guid: str
    vhost: str
    password: str
    #: The agent's ``amqp.queue.type``: its queue is declared with the same arguments.
    queue_type: str = "quorum"

    @property
    def user(self) -> str:
        """The broker user name, ``agent-<guid>``."""
        return f"agent-{self.guid}"

    @property
    def queue(self) -> str:
        """The agent's queue, ``hostdev.agent.<guid>``."""
        return f"hostdev.agent.{self.guid}"

    def commands(self) -> list[list[str]]:
        """The ``rabbitmqctl`` calls that create the user, its permissions and its queue.

        ``import_definitions`` reads :meth:`definitions` on its standard input.
        """
        guid = re.escape(self.guid)
        queue = re.escape(self.queue)
        own = f"^{queue}$"
        write = f"^({queue}|hostdev\\.commands)$"
        read = f"^({queue}|hostdev\\.commands)$"
        return [
            # "--": a password may start with "-" (token_urlsafe makes one in 64),
            # which rabbitmqctl would otherwise read as an option and refuse.
            ["add_user", self.user, "--", self.password],
            # configure: only its own queue; write: bind it (queue) and publish
            # (exchange), not hostdev.dead: no dead letter can be forged;
            # read: consume its queue and bind from the exchange.
            ["set_permissions", "-p", self.vhost, self.user, own, write, read],
            # Topic permissions: publish only as itself, bind only its own keys.
            ["set_topic_permissions", "-p", self.vhost, self.user, COMMANDS_EXCHANGE,
             f"^mgmt\\.{guid}\\.", f"^agent\\.{guid}\\."],
            # Its queue, dead-lettering to hostdev.dead: the agent may not declare
            # that itself (naming a dead-letter exchange takes write on it).
            ["import_definitions"],
        ]

    def definitions(self) -> str:
        """The agent's queue and binding (and the exchanges they need) as definitions JSON.

        The arguments are those the agent's bus declares for its queue type
        (quorum by default: dead-lettering to hostdev.dead after 5 deliveries).
        """
        arguments = queue_arguments(BusConfig(queue_type=self.queue_type))
        exchanges = [{"name": name, "vhost": self.vhost, "type": kind, "durable": True,
                      "auto_delete": False, "internal": False, "arguments": {}}
                     for name, kind in ((COMMANDS_EXCHANGE, "topic"), (DEAD_EXCHANGE, "fanout"))]
        return json.dumps({
            "exchanges": exchanges,
            "queues": [{"name": self.queue, "vhost": self.vhost, "durable": True,
                        "auto_delete": False, "arguments": arguments}],
            "bindings": [{"source": COMMANDS_EXCHANGE, "vhost": self.vhost,
                          "destination": self.queue, "destination_type": "queue",
                          "routing_key": f"agent.{self.guid}.#", "arguments": {}}],
        })

    def shell(self) -> str:
        """The recipe as shell lines an operator can read and run."""
        lines = []
        for argv in self.commands():
            line = "rabbitmqctl " + " ".join(_quote(arg) for arg in argv)
            if argv[0] == "import_definitions":
                line += f" <<'EOF'\n{self.definitions()}\nEOF"
            lines.append(line)
        return "\n".join(lines)


def _quote(arg: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./:@=-]+", arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"


def agent_user_recipe(guid: str, *, vhost: str = "/", password: str | None = None,
                      queue_type: str = "quorum") -> AgentUserRecipe:
    """Builds the recipe for one agent; a password is generated when none is given.

    Raises:
        MgmtError: the guid is not a plain identifier (it becomes part of names and regexes).
    """
    if not GUID_PATTERN.search(guid):
        raise MgmtError(f"agent guid {guid!r} is not valid: expected 1-64 characters of "
                        "letters, digits, '_' and '-', starting with a letter or digit "
                        "(a guid is one word of routing keys and broker user names)")
    if queue_type not in QUEUE_TYPES:
        raise MgmtError(f"queue type {queue_type!r} is not valid: expected 'quorum' or "
                        "'classic', as the agent's amqp.queue.type")
    return AgentUserRecipe(guid=guid, vhost=vhost,
                           password=password or secrets.token_urlsafe(24),
                           queue_type=queue_type)


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
        stdin = recipe.definitions() if argv[0] == "import_definitions" else None
        result = subprocess.run([binary, "-q", *argv], capture_output=True, text=True,
                                input=stdin, check=False)
        if result.returncode != 0:
            raise MgmtError(f"rabbitmqctl {argv[0]} failed for {recipe.user}: "
                            f"{(result.stderr or result.stdout).strip()}")
