"""The demo's cloud: management and three simulated hosts, in one process or on real services.

``InProcessCloud`` runs a ``ManagementService`` and three ``Agent`` objects on
one in-process broker (``hostdev.messages.bus.in_process``) with a SQLite file in a
temporary directory; requests drive every bus until all is handled, so each
answer reflects a settled state. ``ServiceCloud`` runs the same management
service on a thread against a real broker and database, and each agent as a
``hostdev-agent`` process on its simulated host (they migrate to each other
through their mailbox folders, ``agent/simulated_store.py``). Both hand the scenario a
``request(message, timeout)`` function: the one the ``hostdev`` CLI uses.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog

from hostdev.agent.config import parse_config
from hostdev.agent.daemon import Agent
from hostdev.agent.simulated import SimulatedHost, SimulatedHosts
from hostdev.agent.startup_checks import check_host
from hostdev.demo.hosts import DEMO_HOSTS, DemoHost
from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.bus import Bus, BusConfig
from hostdev.messages.bus.in_process import InProcessBroker, InProcessBus
from hostdev.messages.commands import AttachPciDevicesCommand
from hostdev.messages.errors import MessageError
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.errors import MgmtError
from hostdev.mgmt.persistence import database
from hostdev.mgmt.persistence.database_creation import create_database
from hostdev.mgmt.service import ManagementService

log = structlog.get_logger()

#: Sends one API request and returns the typed answer (the CLI's ``Requester``).
Requester = Callable[[Message, float], Message]


class DemoError(Exception):
    """The demo cannot run: says what failed and what to do."""


class Cloud(Protocol):
    """What the scenario needs from a cloud."""

    #: Whether the database was created for the demo (it did not exist).
    created_database: bool

    def request(self, message: Message, timeout: float) -> Message: ...
    def attach_commands(self) -> list[tuple[str, AttachPciDevicesCommand]]: ...
    def close(self) -> None: ...


def prepare_database(db_url: str) -> bool:
    """Creates the database if missing and the schema if it has none; True if it made the database.

    Raises:
        DemoError: the database cannot be opened or created (one line, saying why).
    """
    try:
        created = create_database(db_url)
        if database.current_revision(db_url) is None:
            database.upgrade(db_url)
    except MgmtError as exc:
        raise DemoError(str(exc)) from None
    return created


class InProcessCloud:
    """Management and three agents on one in-process broker, SQLite in ``directory``."""

    def __init__(self, directory: Path, *, db_url: str | None = None,
                 hosts: tuple[DemoHost, ...] = DEMO_HOSTS) -> None:
        self.directory = directory
        self.db_url = db_url or f"sqlite:///{(directory / 'hostdev-demo.sqlite').resolve()}"
        self.hosts = hosts
        self.broker = InProcessBroker()
        self.agents: list[Agent] = []
        #: The hosts migrate to each other in memory: they share this process.
        self.simulated_hosts = SimulatedHosts()
        self.created_database = prepare_database(self.db_url)
        self.engine = database.create_database_engine(self.db_url)
        self.service = ManagementService(MgmtConfig(db_url=self.db_url, amqp_url="memory://"),
                                         InProcessBus(broker=self.broker), self.engine,
                                         name="demo-mgmt")
        self.client = InProcessBus(broker=self.broker)

    def start(self) -> InProcessCloud:
        """Starts management, then each agent (which announces itself); settles the bus."""
        self.service.start()
        for host in self.hosts:
            uri = host.write_spec(self.directory)
            hypervisor = SimulatedHost(uri, hosts=self.simulated_hosts)
            hypervisor.open()
            config = parse_config(host.properties(uri), str(self.directory / f"{host.name}"
                                                                               ".properties"))
            report = check_host(config, hypervisor.pci_devices(), hypervisor.domains(),
                                hypervisor.pci_backends())
            agent = Agent(config, hypervisor, InProcessBus(broker=self.broker), report)
            agent.start()
            self.agents.append(agent)
        self.client.connect()
        self.broker.drain()
        return self

    def request(self, message: Message, timeout: float) -> Message:
        """Sends an API request; every bus handles what is pending until the answer is in."""
        answer = self.client.request(message, timeout=timeout)
        self.broker.drain()  # let the answers of the commands it caused land too
        return answer

    def attach_commands(self) -> list[tuple[str, AttachPciDevicesCommand]]:
        """Returns every ``AttachPciDevicesCommand`` published so far, with its routing key."""
        return self.broker.sent(AttachPciDevicesCommand)  # type: ignore[return-value]

    def close(self) -> None:
        """Stops the agents' hosts and management; disposes of the engine."""
        for agent in self.agents:
            agent.hypervisor.set_lifecycle_listener(None)
            agent.bus.close()
            agent.hypervisor.close()
        self.service.close()
        self.client.close()
        self.engine.dispose()


class AttachRecordingBus(Bus):
    """Management's bus on the broker; keeps each ``AttachPciDevicesCommand`` it publishes.

    The in-process broker lists what was published; on RabbitMQ the demo
    shows the same from the publishing side.
    """

    def __init__(self, config: BusConfig) -> None:
        super().__init__(config)
        self._lock = threading.Lock()
        self._attach_sent: list[tuple[str, AttachPciDevicesCommand]] = []

    def publish(self, routing_key: str, message: Message, **options: Any) -> str:
        """Publishes as :class:`Bus` does, recording attach commands."""
        message_id = super().publish(routing_key, message, **options)
        if isinstance(message, AttachPciDevicesCommand):
            with self._lock:
                self._attach_sent.append((routing_key, message))
        return message_id

    def attach_commands(self) -> list[tuple[str, AttachPciDevicesCommand]]:
        """Returns (routing key, command) of every attach command published so far."""
        with self._lock:
            return list(self._attach_sent)


class ServiceCloud:
    """Management (a thread of this process) and ``hostdev-agent`` processes on real services."""

    def __init__(self, directory: Path, *, amqp_url: str, db_url: str,
                 hosts: tuple[DemoHost, ...] = DEMO_HOSTS) -> None:
        self.directory = directory
        self.amqp_url = amqp_url
        self.db_url = db_url
        self.hosts = hosts
        self.created_database = prepare_database(db_url)
        self.engine = database.create_database_engine(db_url)
        self.bus = AttachRecordingBus(BusConfig(url=amqp_url, app_id="hostdev-demo-mgmt"))
        self.service = ManagementService(
            MgmtConfig(db_url=db_url, amqp_url=amqp_url), self.bus, self.engine,
            name="demo-mgmt")
        self.client = Bus(BusConfig(url=amqp_url, app_id="hostdev-demo"))
        self.processes: list[tuple[DemoHost, subprocess.Popen[bytes], Path]] = []
        self._thread = threading.Thread(target=self._run_service, name="demo-mgmt",
                                        daemon=True)
        self._failure: BaseException | None = None

    def _run_service(self) -> None:
        try:
            self.service.run()
        except BaseException as exc:  # reported by start() and request()
            self._failure = exc

    def start(self, timeout: float = 60.0) -> ServiceCloud:
        """Starts management, then the agents one by one (in order, like the in-process demo)."""
        self._thread.start()
        for host in self.hosts:
            self._start_agent(host)
            self._wait_hosts_up({host.guid}, timeout)
        return self

    def _start_agent(self, host: DemoHost) -> None:
        """Writes the host's spec and agent.properties and starts its hostdev-agent."""
        uri = host.write_spec(self.directory)
        path = self.directory / f"{host.name}.properties"
        path.write_text(host.properties(uri, self.amqp_url), encoding="utf-8")
        log_path = self.directory / f"{host.name}.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "hostdev.agent.daemon", "--config", str(path)],
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((host, process, log_path))

    def _wait_hosts_up(self, wanted: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            self._check_alive()
            try:
                answer = self.request(api.ListHostsRequest(), 5.0)
            except MessageError:
                answer = None
            if isinstance(answer, api.HostList) and wanted <= {
                    h.guid for h in answer.hosts if h.status == "Up"}:
                return
            if time.monotonic() >= deadline:
                raise DemoError(f"the simulated hosts did not come Up within {timeout:g} s; "
                                f"see the agents' logs in {self.directory}")
            time.sleep(delay)  # polling the API: the agents are other processes
            delay = min(delay * 1.5, 0.5)

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise DemoError(f"the management service stopped: {self._failure}")
        for host, process, log_path in self.processes:
            if process.poll() is not None:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-5:])
                raise DemoError(f"hostdev-agent of {host.name} exited with "
                                f"{process.returncode}; its log ({log_path}) ends:\n{tail}")

    def request(self, message: Message, timeout: float) -> Message:
        """Sends an API request over the broker and returns the answer."""
        if self._failure is not None:
            raise DemoError(f"the management service stopped: {self._failure}")
        return self.client.request(message, timeout=timeout)

    def attach_commands(self) -> list[tuple[str, AttachPciDevicesCommand]]:
        """Returns every ``AttachPciDevicesCommand`` management published so far."""
        return self.bus.attach_commands()

    def close(self) -> None:
        """Stops the agents (SIGTERM, then SIGKILL) and management."""
        for _host, process, _log in self.processes:
            if process.poll() is None:
                process.terminate()
        for _host, process, _log in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self.service.stop()
        self._thread.join(timeout=15)
        self.service.close()
        self.client.close()
        self.engine.dispose()


def safe_db_url(url: str) -> str:
    """Returns the URL with its password hidden, for printing."""
    return re.sub(r"^([a-z+]+://[^:/@]*):[^@]*@", r"\1:***@", url)
