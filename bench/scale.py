"""Benchmarks ONE management daemon at cloud scale: N agents' pings, start-ups, deploys.

A load generator speaks the documented protocol (pika, an independent AMQP
client, publishing the JSON bodies on ``mgmt.<guid>.<Type>`` with the
properties an agent sets) as N agents, against ``hostdev-mgmt run`` on the
product's defaults: quorum queues, JSON logs at info (to a file), MariaDB.
Each run gets a throw-away vhost and database (``scratch``).

- ``startup_s_<N>_hosts``: N agents announce themselves
  (``StartupRoutingCommand`` with 16 devices each), all at once; seconds until
  the N hosts are in the database.
- ``ping_cpu_pct_<N>_agents_30s``: then each agent pings every 30 s (pings
  spread evenly; one cycle and until any backlog is drained to warm up,
  ``--cycles`` measured); the daemon
  process's CPU (utime + stime from ``/proc/<pid>/stat``) over the measured
  cycles, in % of one core. The backlog of ``hostdev.mgmt`` is sampled each
  second; its largest value is printed (a daemon at its limit lets it grow).
- ``ping_cpu_ratio``: that CPU over the CPU of a competent raw consumer doing
  the same work by hand (kombu's py-amqp connection as the bus uses it,
  prefetch 50, batches of up to 50 or 0.1 s, one ``UPDATE ... WHERE guid
  IN`` and one COMMIT per batch, one ``multiple`` ack), fed the same pings
  from the same generator in a vhost and database of its own.
- ``deploys_per_s_1_mgmt_quorum``: ``bench/deploy.py``'s deploys end to end
  with one daemon (20 simulated hosts run by the agent's own code).
- ``placement_p50_ms_10000_hosts_half_refused``,
  ``placement_p99_ms_100000_hosts`` and
  ``placement_p50_ms_100000_hosts_half_refused``: ``bench/placement.py``'s searches in its
  "half refused" world (the first half of the hosts refused while having free
  devices) of 10,000 and of 100,000 hosts (``--no-placement`` skips them;
  ``bench/placement.py`` has the other layouts and the EXPLAIN).

Prints a table, then ``metric=NAME value=NUMBER unit=UNIT`` lines.
Run: ``.venv/bin/python bench/scale.py [--agents 10000] [--cycles 2] [--no-deploys]
[--no-placement]``.
(``--cycles 0 --no-deploys --no-placement``: the start-up figure alone; ``--restart``: then
every agent restarts at once, ``restart_s_<N>_hosts``).
Uses both cores: run it on a quiet machine, and read the load average it prints.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing as mp
import os
import socket
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import deploy
import kombu
import msgspec
import pika
import placement
import pymysql
import scratch

from hostdev.messages.base import Message
from hostdev.messages.bus.contract import COMMANDS_EXCHANGE, MGMT_QUEUE
from hostdev.messages.codec import domains_digest, encode
from hostdev.messages.commands import PingRoutingCommand, StartupRoutingCommand
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.runtime.logging import configure_logging
from hostdev.messages.values import PciDeviceInfo

PING_INTERVAL_S = 30.0
DEVICES = tuple(PciDeviceInfo(address=PciAddress(f"{0x20 + d:02x}:00.0"), name="10GE",
                              vendor_id="0x8086", product_id="0x1572", iommu_group=d)
                for d in range(16))
#: Where agents' answers go here: one queue for all (no 10,000 agent queues), kept short.
ANSWERS_QUEUE = "bench.agents"
RAW_QUEUE = "bench.raw.pings"
RAW_BATCH = 50


def guid(n: int) -> str:
    """The guid of simulated agent ``n``."""
    return f"scale-{n:06d}"


def cpu_seconds(pid: int) -> float:
    """Returns the CPU (user + system) process ``pid`` used so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Generator:
    """N agents on one pika connection, publishing as they would (``user_id`` guest)."""

    def __init__(self, amqp_url: str, agents: int, interval_s: float) -> None:
        self.agents = agents
        self.interval_s = interval_s
        self.boot_id = uuid.uuid4().hex
        self.seq = 0
        self.connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.channel = self.connection.channel()
        self.channel.queue_declare(ANSWERS_QUEUE, arguments={"x-max-length": 1000})
        self.channel.queue_bind(ANSWERS_QUEUE, COMMANDS_EXCHANGE, "agent.#")

    def publish(self, n: int, message: Message) -> None:
        """Publishes agent ``n``'s message on ``mgmt.<guid>.<Type>``, persistent."""
        kind = type(message).__name__
        self.channel.basic_publish(
            COMMANDS_EXCHANGE, f"mgmt.{guid(n)}.{kind}", encode(message),
            pika.BasicProperties(content_type="application/json", type=kind,
                                 message_id=str(uuid.uuid4()), user_id="guest",
                                 app_id="bench-agent", delivery_mode=2))

    def startups(self) -> None:
        """Every agent announces itself once (again after ``restart``)."""
        for n in range(self.agents):
            self.seq += 1
            self.publish(n, StartupRoutingCommand(
                guid=guid(n), name=f"scale{n:06d}", cpus=64, memory_mb=262144,
                pci_devices=DEVICES, boot_id=self.boot_id, seq=self.seq))

    def restart(self) -> None:
        """Every agent restarts: a new boot id, its reports numbered from 1 again."""
        self.boot_id = uuid.uuid4().hex
        self.seq = 0

    def pings(self, seconds: float, sample: Callable[[], None]) -> None:
        """Pings, each agent every ``interval_s``, for ``seconds``; ``sample()`` each second."""
        digest = domains_digest(())
        rate = self.agents / self.interval_s
        start = time.monotonic()
        next_sample = start + 1.0
        sent = 0
        while True:
            now = time.monotonic()
            if now - start >= seconds:
                return
            due = int((now - start) * rate)
            while sent < due:
                self.seq += 1
                self.publish(sent % self.agents, PingRoutingCommand(
                    guid=guid(sent % self.agents), boot_id=self.boot_id, seq=self.seq,
                    domains_digest=digest))
                sent += 1
            if now >= next_sample:
                next_sample += 1.0
                sample()
            self.connection.sleep(0.01)

    def backlog(self, queue: str) -> int:
        """Returns the messages waiting in ``queue``."""
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)

    def close(self) -> None:
        """Closes the connection."""
        self.connection.close()


def count_hosts(db_url: str, boot_id: str | None = None) -> int:
    """Returns the rows of ``hosts`` (whose last report is of ``boot_id``, if given)."""
    with _connect(db_url) as conn, conn.cursor() as cursor:
        if boot_id is None:
            cursor.execute("SELECT COUNT(*) FROM hosts")
        else:
            cursor.execute("SELECT COUNT(*) FROM hosts WHERE report_boot_id = %s", (boot_id,))
        return int(cursor.fetchone()[0])


@contextmanager
def _connect(db_url: str) -> Iterator[Any]:
    name = _database_name(db_url)
    conn = pymysql.connect(unix_socket=scratch.MARIADB_SOCKET, user="root", database=name,
                           autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


def _database_name(db_url: str) -> str:
    return db_url.split("?")[0].rsplit("/", 1)[1]


def measure_pings(generator: Generator, pid: int, queue: str, cycles: int) -> tuple[float, int]:
    """Warms up (one cycle, then until the backlog is drained), then measures ``cycles``.

    Returns (% of one core over the measured cycles, largest backlog meanwhile).
    """
    generator.pings(generator.interval_s, lambda: None)
    deadline = time.monotonic() + 600
    while generator.backlog(queue) > generator.agents // 100:
        if time.monotonic() > deadline:
            raise SystemExit(f"{queue} still holds {generator.backlog(queue)} pings after "
                             "10 minutes of pinging: the consumer cannot keep up")
        generator.pings(5.0, lambda: None)
    backlog = [0]
    before, started = cpu_seconds(pid), time.monotonic()
    generator.pings(generator.interval_s * cycles,
                    lambda: backlog.append(generator.backlog(queue)))
    used, elapsed = cpu_seconds(pid) - before, time.monotonic() - started
    return 100.0 * used / elapsed, max(backlog)


def bench_hostdev(agents: int, cycles: int, interval_s: float,
                  restart: bool = False) -> tuple[float, float | None, int | None, float | None]:
    """Returns (start-up s, ping CPU %, largest backlog, restart s) of one ``hostdev-mgmt run``.

    With ``cycles`` 0 the pings are not measured (None, None): start-ups only.
    With ``restart``, every agent then restarts and announces itself again
    (known hosts, registered by the full path): seconds until all are.
    """
    with scratch.vhost("scale") as amqp_url, scratch.database("scale") as db_url, \
            tempfile.TemporaryDirectory(prefix="hostdev-bench-") as directory:
        mgmt = deploy.start_mgmt(db_url, amqp_url, Path(directory), 0)
        try:
            _wait(lambda: _queue_exists(amqp_url, MGMT_QUEUE), mgmt, 60, "hostdev-mgmt")
            generator = Generator(amqp_url, agents, interval_s)
            started = time.monotonic()
            generator.startups()
            _wait(lambda: count_hosts(db_url) >= agents, mgmt, 1800, f"{agents} hosts",
                  sleep=generator.connection.sleep)  # keeps its heartbeats going
            startup_s = time.monotonic() - started
            restart_s = None
            if restart:
                generator.restart()
                started = time.monotonic()
                generator.startups()
                _wait(lambda: count_hosts(db_url, generator.boot_id) >= agents, mgmt, 1800,
                      f"{agents} hosts registered again", sleep=generator.connection.sleep)
                restart_s = time.monotonic() - started
            if cycles == 0:
                generator.close()
                return startup_s, None, None, restart_s
            cpu, backlog = measure_pings(generator, mgmt.pid, MGMT_QUEUE, cycles)
            generator.close()
            return startup_s, cpu, backlog, restart_s
        finally:
            mgmt.terminate()
            mgmt.wait(30)


def raw_consumer(amqp_url: str, db_url: str, ready: Any) -> None:
    """The baseline: pings consumed and written by hand, one UPDATE and COMMIT per batch.

    The same AMQP library as the bus (kombu's py-amqp connection, read as
    ``bench/bus.py``'s raw consumer reads), the same batching (up to 50,
    at most 0.1 s), the routing key's guid checked against the body's.
    """
    conn = kombu.Connection(amqp_url)
    conn.connect()
    channel = conn.channel()
    channel.basic_qos(0, RAW_BATCH, False)
    inbox: deque[Any] = deque()
    channel.basic_consume(RAW_QUEUE, callback=inbox.append)
    raw = conn.connection
    db = pymysql.connect(unix_socket=scratch.MARIADB_SOCKET, user="root",
                         database=_database_name(db_url))
    decoder = msgspec.json.Decoder(_RawPing)
    batch: list[str] = []
    last_tag = 0
    due = 0.0
    ready.set()
    while True:
        wait = max(0.0, due - time.monotonic()) if batch else 1.0
        with contextlib.suppress(TimeoutError, socket.timeout):
            raw.drain_events(timeout=wait)
        while inbox:
            message = inbox.popleft()
            ping = decoder.decode(message.body)
            if message.delivery_info["routing_key"].split(".")[1] == ping.guid:
                if not batch:
                    due = time.monotonic() + 0.1
                batch.append(ping.guid)
            last_tag = message.delivery_tag
        if batch and (len(batch) >= RAW_BATCH or time.monotonic() >= due):
            with db.cursor() as cursor:
                cursor.execute("UPDATE hosts SET last_ping = NOW(6) WHERE guid IN %s", (batch,))
            db.commit()
            channel.basic_ack(last_tag, multiple=True)
            batch.clear()


class _RawPing(msgspec.Struct):
    guid: str


def bench_raw(agents: int, cycles: int, interval_s: float) -> float:
    """Returns the raw consumer's CPU (% of one core) for the same pings."""
    with scratch.vhost("scale-raw") as amqp_url, \
            scratch.database("scale_raw", migrate=False) as db_url:
        with _connect(db_url) as conn, conn.cursor() as cursor:
            cursor.execute("CREATE TABLE hosts (guid VARCHAR(64) PRIMARY KEY, "
                           "last_ping DATETIME(6)) ENGINE=InnoDB")
            cursor.executemany("INSERT INTO hosts (guid) VALUES (%s)",
                               [guid(n) for n in range(agents)])
        setup = pika.BlockingConnection(pika.URLParameters(amqp_url))
        channel = setup.channel()
        channel.exchange_declare(COMMANDS_EXCHANGE, "topic", durable=True)
        channel.queue_declare(RAW_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_bind(RAW_QUEUE, COMMANDS_EXCHANGE, "mgmt.#")
        setup.close()
        context = mp.get_context("spawn")
        ready = context.Event()
        consumer = context.Process(target=raw_consumer, args=(amqp_url, db_url, ready))
        consumer.start()
        try:
            ready.wait(60)
            generator = Generator(amqp_url, agents, interval_s)
            cpu, _ = measure_pings(generator, consumer.pid or 0, RAW_QUEUE, cycles)
            generator.close()
            return cpu
        finally:
            consumer.terminate()
            consumer.join(10)


def _queue_exists(amqp_url: str, queue: str) -> bool:
    try:
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    except pika.exceptions.AMQPError:
        return False
    try:
        connection.channel().queue_declare(queue, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False
    finally:
        if connection.is_open:
            connection.close()


def _wait(condition: Callable[[], bool], process: Any, timeout: float, what: str, *,
          sleep: Callable[[float], None] = time.sleep) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise SystemExit(f"hostdev-mgmt exited with {process.returncode} waiting for {what}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        sleep(0.2)  # polling another process


def main() -> None:
    """Runs the benchmarks and prints the table and metric lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10000)
    parser.add_argument("--cycles", type=int, default=2,
                        help="ping cycles measured (0: no pings, start-ups only)")
    parser.add_argument("--interval", type=float, default=PING_INTERVAL_S,
                        help="seconds between two pings of one agent (the metric names 30 s)")
    parser.add_argument("--vms", type=int, default=300, help="VMs of the deploy figure")
    parser.add_argument("--no-deploys", action="store_true", help="skip the deploy figure")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw baseline")
    parser.add_argument("--no-placement", action="store_true",
                        help="skip the placement figures (their worlds take a minute to build)")
    parser.add_argument("--restart", action="store_true",
                        help="then restart every agent at once (known hosts registering again)")
    args = parser.parse_args()
    configure_logging("warning")
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # the polls for hostdev.mgmt
    n = args.agents
    load_before = os.getloadavg()[0]
    startup_s, cpu, backlog, restart_s = bench_hostdev(n, args.cycles, args.interval,
                                                       args.restart)
    raw = None if args.no_raw or cpu is None else bench_raw(n, args.cycles, args.interval)
    deploys = None if args.no_deploys else deploy.bench_deploys(
        min(args.vms, deploy.HOSTS * deploy.DEVICES_PER_HOST), 1)
    places = None if args.no_placement else (
        placement.p50_p99(placement.measure(10_000, "half refused"))[0],
        *placement.p50_p99(placement.measure(100_000, "half refused"))[::-1])
    load_after = os.getloadavg()[0]
    rows: list[tuple[str, str, str, str]] = [
        (f"startup_s_{n}_hosts", f"{n} hosts registered (16 devices each)", f"{startup_s:.1f}",
         "s"),
    ]
    if restart_s is not None:
        rows.append((f"restart_s_{n}_hosts", f"{n} known hosts registered again",
                     f"{restart_s:.1f}", "s"))
    if cpu is not None:
        rows += [
            (f"ping_cpu_pct_{n}_agents_{args.interval:g}s",
             f"mgmt CPU, {n} agents pinging every {args.interval:g} s", f"{cpu:.1f}", "%"),
            (f"ping_backlog_max_{n}_agents", "largest hostdev.mgmt backlog meanwhile",
             f"{backlog}", "messages"),
        ]
    if raw is not None and cpu is not None:
        rows += [(f"ping_cpu_pct_{n}_agents_{args.interval:g}s_raw", "raw consumer CPU, same pings",
                  f"{raw:.1f}", "%"),
                 ("ping_cpu_ratio", "hostdev / raw CPU", f"{cpu / raw:.2f}", "x")]
    if places is not None:
        rows += [
            ("placement_p50_ms_10000_hosts_half_refused", "placement p50, 10,000 hosts, half "
             "refused", f"{places[0]:.2f}", "ms"),
            ("placement_p99_ms_100000_hosts", "placement p99, 100,000 hosts, half refused",
             f"{places[1]:.2f}", "ms"),
            ("placement_p50_ms_100000_hosts_half_refused", "placement p50, 100,000 hosts, "
             "half refused", f"{places[2]:.2f}", "ms"),
        ]
    if deploys is not None:
        rows.append(("deploys_per_s_1_mgmt_quorum", "deploys end to end, 1 mgmt, quorum",
                     f"{deploys:.1f}", "1/s"))
    print(f"load average (1 min) before {load_before:.2f}, after {load_after:.2f} "
          f"on {os.cpu_count()} cores")
    print(f"{'figure':<52}{'value':>10}  unit")
    for _, label, value, unit in rows:
        print(f"{label:<52}{value:>10}  {unit}")
    for name, _, value, unit in rows:
        print(f"metric={name} value={value} unit={unit}")


if __name__ == "__main__":
    main()
