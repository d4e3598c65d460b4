"""A whole hostdev deployment as real processes: ``hostdev-mgmt run`` daemons and agents.

``Stack`` owns a fresh RabbitMQ vhost and a fresh MariaDB database, a work
folder with ``mgmt.properties`` (short host and job timeouts), and the
processes it starts: management daemons (``start_mgmt``) and simulated hosts,
each a ``hostdev-agent`` on a persistent ``simulated:///`` spec
(``start_host``). Tests drive it only from outside: the ``hostdev`` CLI as a
subprocess (``cli``), API requests on a Bus client (``request``), plain SQL
on the database (``sql``), and the simulated hosts' state files
(``SimHost.domains``), which the agents rewrite after every libvirt change.

Usage (pytest)::

    @pytest.fixture(scope="module")
    def stack(tmp_path_factory):
        with e2e_stack(tmp_path_factory.mktemp("e2e")) as created:
            created.start_mgmt()
            created.start_host("h1", {"10GE": 4})
            created.wait_hosts_up()
            yield created
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import uuid as uuid_module
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hostdev.agent.domain_xml import read_hostdevs, read_identity
from hostdev.agent.simulated_state import state_path
from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.bus import Bus, BusConfig
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.runtime.properties import read_properties
from hostdev.messages.values import HostRow
from tests.support.databases import connect_url, mariadb_database
from tests.support.processes import BIN, Daemon
from tests.support.rabbitmq import HOST, PORT, Vhost, amqp_vhost, rabbitmqctl
from tests.support.waiting import wait_for

#: mgmt.properties values that make a killed agent Down within seconds.
FAST_MGMT: dict[str, str] = {
    "amqp.queue.type": "classic",
    "ping.interval": "500ms",
    "host.disconnected.timeout": "2s",
    "host.down.timeout": "3s",
    "host.sweep.interval": "250ms",
    "job.start.timeout": "20s",
    "job.stop.timeout": "20s",
    "job.sweep.interval": "500ms",
    "log.format": "json",
    "log.level": "info",
}

#: The PCI bus each device name's functions sit on (8 functions per slot).
_BUSES = {"10GE": 0x28, "GPU": 0x3b, "40GE": 0x5e}


def device_addresses(devices: Mapping[str, int]) -> dict[PciAddress, str]:
    """Returns the addresses of ``{"10GE": 4}``: 0000:28:00.0 ... 0000:28:00.3 -> 10GE."""
    found: dict[PciAddress, str] = {}
    for index, (name, count) in enumerate(devices.items()):
        bus = _BUSES.get(name, 0x60 + index)
        for n in range(count):
            found[PciAddress(f"{bus:02x}:{n // 8:02x}.{n % 8}")] = name
    return found


@dataclass
class SimHost:
    """One simulated host: its spec, its agent.properties and its agent process."""

    name: str
    guid: str
    spec_path: Path
    config_path: Path
    devices: dict[PciAddress, str]
    work: Path
    daemon: Daemon
    env: dict[str, str] = field(default_factory=dict)
    restarts: int = 0

    @property
    def running(self) -> bool:
        """True while the agent process runs."""
        return self.daemon.running

    def kill(self) -> None:
        """SIGKILLs the agent (the simulated domains stay in the state file)."""
        self.daemon.kill()

    def pause(self) -> None:
        """SIGSTOPs the agent: its connection stays open, what it receives waits."""
        assert self.daemon.process is not None
        os.killpg(self.daemon.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONTs an agent ``pause`` stopped."""
        assert self.daemon.process is not None
        os.killpg(self.daemon.process.pid, signal.SIGCONT)

    def restart(self) -> Daemon:
        """Starts the agent again (after ``kill`` or ``stop``) with a new log file."""
        if self.daemon.running:
            self.daemon.stop()
        self.restarts += 1
        self.daemon = Daemon(f"agent-{self.name}-{self.restarts}",
                             ["hostdev-agent", "--config", str(self.config_path)], self.work,
                             env=self.env).start()
        return self.daemon

    def volumes(self, pool: str) -> list[str]:
        """Reads the VMs' own volumes of one pool from the host's state file, by name."""
        path = state_path(self.spec_path)
        if not path.exists():
            return []
        saved = json.loads(path.read_text(encoding="utf-8")).get("volumes", {})
        return sorted(ET.fromstring(xml).findtext("name", "") for xml in saved.get(pool, []))

    def domains(self) -> dict[str, tuple[str, bool, tuple[PciAddress, ...]]]:
        """Reads the host's domains from its state file: uuid -> (name, running, hostdevs)."""
        path = state_path(self.spec_path)
        if not path.exists():
            return {}
        found = {}
        for entry in json.loads(path.read_text(encoding="utf-8"))["domains"]:
            vm_uuid, name = read_identity(entry["xml"])
            found[vm_uuid] = (name, bool(entry["running"]), read_hostdevs(entry["xml"]))
        return found


class EventTap:
    """A queue bound to every key of ``hostdev.events``, read with plain pika (as a tool would)."""

    def __init__(self, url: str, name: str) -> None:
        import pika

        self.queue = name
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.queue_declare(name, exclusive=True)
        self.channel.queue_bind(name, "hostdev.events", "#")
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """Reads what arrived; returns every (routing key, body) so far, in order."""
        while True:
            method, _properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return self.seen
            self.seen.append((method.routing_key, json.loads(body)))

    def routing_keys(self) -> list[str]:
        """Returns the routing keys seen so far, in order."""
        return [key for key, _ in self.events()]

    def close(self) -> None:
        """Closes the connection (the exclusive queue goes with it)."""
        if self.connection.is_open:
            self.connection.close()


class Stack:
    """A vhost, a database, a work folder and the daemons started in them."""

    def __init__(self, vhost: Vhost, db_url: str, work: Path,
                 mgmt_properties: Mapping[str, str] | None = None) -> None:
        self.vhost = vhost
        self.db_url = db_url
        self.work = work
        self.mgmt_config = work / "mgmt.properties"
        values = {"db.url": db_url, "amqp.url": vhost.url, **FAST_MGMT,
                  **(mgmt_properties or {})}
        self.mgmt_config.write_text("".join(f"{k}={v}\n" for k, v in values.items()),
                                    encoding="utf-8")
        self.queue_type = values["amqp.queue.type"]
        self.mgmts: list[Daemon] = []
        self.hosts: dict[str, SimHost] = {}
        self._bus: Bus | None = None
        self._started = 0
        self._taps: list[EventTap] = []
        self._users: list[str] = []

    # -- processes ---------------------------------------------------------------

    def start_mgmt(self, *, env: Mapping[str, str] | None = None, wait: bool = True,
                   properties: Mapping[str, str] | None = None) -> Daemon:
        """Starts ``hostdev-mgmt run`` on the stack's config; waits until it consumes.

        ``properties`` replace lines of the stack's mgmt.properties for this
        daemon only (its own ``db.url``...), in a file of its own.
        """
        self._started += 1
        name = f"mgmt-{self._started}"
        config = self.mgmt_config
        if properties:
            config = self.work / f"{name}.properties"
            values = {**read_properties_file(self.mgmt_config), **properties}
            config.write_text("".join(f"{k}={v}\n" for k, v in values.items()),
                              encoding="utf-8")
        daemon = Daemon(name, ["hostdev-mgmt", "run", "--config", str(config),
                               "--name", name], self.work, env=dict(env or {})).start()
        self.mgmts.append(daemon)
        if wait:
            daemon.wait_log("mgmt_started", timeout=60)
        return daemon

    def start_host(self, name: str, devices: Mapping[str, int], *, cpus: int = 16,
                   memory_mb: int = 65536, ping: str = "500ms",
                   env: Mapping[str, str] | None = None,
                   spec_extra: Mapping[str, Any] | None = None,
                   agent_properties: Mapping[str, str] | None = None,
                   own_user: bool = False) -> SimHost:
        """Writes a persistent simulated host with ``devices`` and starts its agent.

        ``spec_extra`` adds keys to the simulated-host spec (``refuse_detach``...),
        ``agent_properties`` lines to agent.properties (``migration.uri``...).
        With ``own_user`` the agent connects as its own broker user
        (``add_agent_user``) instead of guest, on the queue its recipe created
        (of the stack's queue type).
        """
        guid = str(uuid_module.uuid5(uuid_module.NAMESPACE_URL, f"{self.work}/{name}"))
        amqp_url = self.add_agent_user(guid) if own_user else self.vhost.url
        addresses = device_addresses(devices)
        spec = {"name": name, "cpus": cpus, "memory_mb": memory_mb, "persist": True,
                "devices": [{"address": str(a)} for a in addresses], **(spec_extra or {})}
        spec_path = self.work / f"{name}.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        pci = ",".join(f"{a}|{n}" for a, n in addresses.items())
        config_path = self.work / f"agent-{name}.properties"
        config_path.write_text(
            f"guid={guid}\nname={name}\namqp.url={amqp_url}\n"
            f"amqp.queue.type={self.queue_type}\nlibvirt.uri=simulated://{spec_path}\n"
            f"pci.devices={pci}\nping.interval={ping}\nlog.format=json\nlog.level=info\n"
            + "".join(f"{k}={v}\n" for k, v in (agent_properties or {}).items()),
            encoding="utf-8")
        daemon = Daemon(f"agent-{name}", ["hostdev-agent", "--config", str(config_path)],
                        self.work, env=dict(env or {})).start()
        host = SimHost(name=name, guid=guid, spec_path=spec_path, config_path=config_path,
                       devices=addresses, work=self.work, daemon=daemon, env=dict(env or {}))
        self.hosts[name] = host
        return host

    def wait_hosts_up(self, *names: str, timeout: float = 60.0) -> list[HostRow]:
        """Waits until management lists these hosts (default: all) Up; returns every row."""
        wanted = set(names or self.hosts)

        def up() -> list[HostRow] | None:
            rows = self.hosts_by_name()
            ok = all(n in rows and rows[n].status == "Up" for n in wanted)
            return list(rows.values()) if ok else None
        return wait_for(up, timeout=timeout, what=f"hosts {sorted(wanted)} Up")

    def add_agent_user(self, guid: str) -> str:
        """Creates broker user ``agent-<guid>`` as an operator would; returns its AMQP URL.

        Runs ``hostdev-mgmt rabbitmq-user add GUID --vhost V --apply`` and reads
        the password from what it prints; ``close`` deletes the user.
        """
        done = subprocess.run(
            [str(BIN / "hostdev-mgmt"), "rabbitmq-user", "add", guid, "--vhost",
             self.vhost.name, "--queue-type", self.queue_type, "--apply"],
            capture_output=True, text=True, timeout=120,
            check=False)
        assert done.returncode == 0, f"rabbitmq-user add {guid} failed: {done.stderr}"
        self._users.append(f"agent-{guid}")
        found = re.search(r"^amqp\.url=amqp://([^:]+):(\S+)@<broker>", done.stdout, re.M)
        assert found, f"no amqp.url in: {done.stdout}"
        user, password = found.groups()
        return (f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{HOST}:{PORT}/"
                f"{quote(self.vhost.name, safe='')}")

    def tap_events(self) -> EventTap:
        """Starts recording ``hostdev.events`` (needs a management daemon started first)."""
        tap = EventTap(self.vhost.url, f"e2e-events-{len(self._taps)}")
        self._taps.append(tap)
        return tap

    def close(self) -> None:
        """Stops every process (agents first) and closes the client bus; idempotent."""
        for tap in self._taps:
            tap.close()
        for host in self.hosts.values():
            host.daemon.stop()
        for daemon in self.mgmts:
            daemon.stop()
        if self._bus is not None:
            self._bus.close()
            self._bus = None
        while self._users:  # broker users outlive the vhost: delete them here
            rabbitmqctl("delete_user", self._users.pop())

    # -- driving it from outside --------------------------------------------------

    @property
    def bus(self) -> Bus:
        """A client bus for API requests (opened on first use)."""
        if self._bus is None:
            self._bus = Bus(BusConfig(url=self.vhost.url, queue_type=self.queue_type,
                                      app_id="hostdev-e2e"))
        return self._bus

    def request(self, message: Message, timeout: float = 15.0) -> Message:
        """Sends one API request and returns the answer (RemoteError on a refusal)."""
        return self.bus.request(message, timeout=timeout)

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Runs ``hostdev ARGS`` against this stack's broker; returns the finished process."""
        env = {**os.environ, "HOSTDEV_AMQP_URL": self.vhost.url}
        return subprocess.run([str(BIN / "hostdev"), *args], capture_output=True, text=True,
                              timeout=timeout, env=env, check=False)

    def cli_json(self, *args: str) -> Any:
        """Runs ``hostdev ARGS --json``, fails on a non-zero status, returns the JSON."""
        done = self.cli(*args, "--json")
        assert done.returncode == 0, f"hostdev {' '.join(args)} failed: {done.stderr}"
        return json.loads(done.stdout)

    def hosts_by_name(self) -> dict[str, HostRow]:
        """Lists hosts through the API, by name."""
        answer = self.request(api.ListHostsRequest())
        assert isinstance(answer, api.HostList)
        return {row.name: row for row in answer.hosts}

    def job(self, job_id: int) -> Any:
        """Returns a job's row through the API."""
        answer = self.request(api.GetJobRequest(job_id=job_id))
        assert isinstance(answer, api.JobList) and answer.jobs, answer
        return answer.jobs[0]

    def wait_job(self, job_id: int, timeout: float = 60.0) -> Any:
        """Waits until a job succeeded or failed; returns its row."""
        return wait_for(lambda: (row if (row := self.job(job_id)).state in
                                 ("succeeded", "failed") else None),
                        timeout=timeout, what=f"job {job_id} to finish")

    def sql(self, query: str, *params: object, url: str | None = None) -> list[dict[str, Any]]:
        """Runs plain SQL on the stack's MariaDB database; returns the rows as dicts.

        ``url``: another node's URL of the same database (default: the first of ``db_url``).
        """
        with connect_url(url or self.db_url.split(";")[0]) as conn, conn.cursor() as cursor:
            cursor.execute(query, params or None)
            return list(cursor.fetchall())


def read_properties_file(path: Path) -> dict[str, str]:
    """Reads a properties file the stack wrote: key -> value, in order."""
    return {p.key: p.value for p in read_properties(path)}


@contextmanager
def e2e_stack(work: Path, *, prefix: str = "e2e",
              mgmt_properties: Mapping[str, str] | None = None) -> Iterator[Stack]:
    """Yields a ``Stack`` on a fresh vhost and database; stops its processes and drops both."""
    with ExitStack() as cleanup:
        vhost = cleanup.enter_context(amqp_vhost(prefix))
        db_url = cleanup.enter_context(mariadb_database(f"hostdev_{prefix.replace('-', '_')}"))
        stack = Stack(vhost, db_url, work, mgmt_properties)
        cleanup.callback(stack.close)
        yield stack
