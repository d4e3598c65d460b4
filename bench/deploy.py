"""Benchmarks deploys end to end and the placement query, on the real broker and MariaDB.

- ``deploys_per_s``: VMs deployed per second, from the first ``DeployVmRequest``
  to the last ``vm.<uuid>.Running`` event, with 20 simulated hosts (scripted
  agents answering ``StartCommand`` at once, all on one bus in a child process,
  reading only the ``vm.*.Running`` events) and ``--daemons`` management
  daemons (default two: a daemon is one thread, the machine has two cores) in
  child processes; 16 client threads send the requests (16 deploys in flight).
  Offering: one 10GE device; 16 per host. ``deploys_per_s_1_mgmt`` is the same
  with one daemon.
- ``placement_p50_ms_<N>_hosts``: the planner's search (``find_hosts``) on
  N hosts of 16 devices each, half of them full (first fit has to skip them).

Prints a table, then ``metric=NAME value=NUMBER unit=UNIT`` lines.
Run: ``.venv/bin/python bench/deploy.py [--vms 300]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from hostdev.messages import api
from hostdev.messages.bus import Bus, BusConfig
from hostdev.messages.bus.contract import EVENTS_EXCHANGE
from hostdev.messages.commands import (
    StartAnswer,
    StartCommand,
    StartupAnswer,
    StartupRoutingCommand,
)
from hostdev.messages.events import VmStateChanged
from hostdev.messages.runtime.logging import configure_logging
from hostdev.messages.values import PciRequest
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.persistence.database import create_database_engine
from hostdev.mgmt.persistence.models import Host, PciDevice
from hostdev.mgmt.placement import planner
from tests.support.databases import mariadb_database
from tests.support.mgmt_harness import devices
from tests.support.rabbitmq import amqp_vhost

HOSTS = 20
DEVICES_PER_HOST = 16
CLIENTS = 16


def _run_mgmt(db_url: str, amqp_url: str) -> None:
    from hostdev.mgmt.runner import run
    configure_logging("warning")
    run(MgmtConfig(db_url=db_url, amqp_url=amqp_url, amqp_queue_type="classic",
                   log_level="warning"), name="bench")


class Agents:
    """20 scripted agents on one bus: register, answer StartCommand, count Running events.

    Runs in a child process (``run_agents``) so the agents and the clients do
    not share one interpreter lock; the counters are shared values.
    """

    def __init__(self, url: str, counters: Counters) -> None:
        self.bus = Bus(BusConfig(url=url, queue_type="classic", app_id="bench-agents"))
        self.guids = [f"bench-{n:02d}" for n in range(HOSTS)]
        self.counters = counters

    def _start(self, command: StartCommand, _: Any) -> StartAnswer:
        return StartAnswer(vm_uuid=command.vm.uuid, hostdevs=command.vm.pci_devices)

    def _registered(self, answer: StartupAnswer, _: Any) -> None:
        with self.counters.registered.get_lock():
            self.counters.registered.value += 1

    def _event(self, event: VmStateChanged, _: Any) -> None:
        if event.state == "Running":
            self.counters.running.value += 1
            self.counters.last_running.value = time.monotonic()

    def run(self) -> None:
        """Declares the queues, announces every host and answers until terminated."""
        self.bus.connect()
        for guid in self.guids:
            queue = self.bus.declare_agent_queue(guid)
            self.bus.consume(queue, {StartCommand: self._start,
                                     StartupAnswer: self._registered})
        self.bus.declare_queue("bench.events", ["vm.*.Running"], exchange=EVENTS_EXCHANGE)
        self.bus.consume("bench.events", {VmStateChanged: self._event})
        for n, guid in enumerate(self.guids):
            self.bus.send_to_mgmt(guid, StartupRoutingCommand(
                guid=guid, name=f"sim{n:02d}", cpus=512, memory_mb=1 << 20,
                pci_devices=devices(DEVICES_PER_HOST)))
        self.bus.run()


class Counters:
    """Values shared with the agents' process."""

    def __init__(self, context: Any) -> None:
        self.registered = context.Value("i", 0)
        self.running = context.Value("i", 0)
        self.last_running = context.Value("d", 0.0)


def run_agents(url: str, counters: Counters) -> None:
    """Child process: the 20 scripted agents."""
    configure_logging("warning")
    Agents(url, counters).run()


def bench_deploys(vms: int, daemons: int = 1) -> float:
    """Returns VMs deployed per second end to end."""
    with amqp_vhost("bench-deploy") as vhost, mariadb_database("bench_deploy") as db_url:
        processes = [mp.get_context("spawn").Process(target=_run_mgmt, args=(db_url, vhost.url))
                     for _ in range(daemons)]
        for process in processes:
            process.start()
        context = mp.get_context("spawn")
        counters = Counters(context)
        agents = context.Process(target=run_agents, args=(vhost.url, counters))
        try:
            client = Bus(BusConfig(url=vhost.url, queue_type="classic", app_id="bench"))
            _wait(lambda: _answers(client), 30, "management daemon")
            agents.start()
            _wait(lambda: counters.registered.value == HOSTS, 30, "agents registered")
            client.request(api.CreateOfferingRequest(name="one10ge", cpus=1, memory_mb=256,
                                                     pci_devices="10GE"))
            names = iter(range(vms))
            lock = threading.Lock()
            errors: list[str] = []

            def deploy_loop() -> None:
                bus = Bus(BusConfig(url=vhost.url, queue_type="classic", app_id="bench"))
                while True:
                    with lock:
                        n = next(names, None)
                    if n is None:
                        break
                    answer = bus.request(api.DeployVmRequest(name=f"vm{n}",
                                                             offering="one10ge"), timeout=30)
                    if not isinstance(answer, api.JobAccepted):
                        errors.append(str(answer))
                bus.close()

            threads = [threading.Thread(target=deploy_loop) for _ in range(CLIENTS)]
            start = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            _wait(lambda: counters.running.value >= vms, 120, f"{vms} VMs Running")
            elapsed = counters.last_running.value - start
            if errors:
                raise SystemExit(f"deploys refused: {errors[:3]}")
            client.close()
            return vms / elapsed
        finally:
            agents.terminate()
            agents.join(10)
            for process in processes:
                process.terminate()
            for process in processes:
                process.join(10)


def _answers(client: Bus) -> bool:
    try:
        client.request(api.ListHostsRequest(), timeout=1)
        return True
    except Exception:
        return False


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def bench_placement(hosts: int, samples: int = 200) -> float:
    """Returns the p50 in ms of ``find_hosts`` over ``hosts`` hosts, the first half full."""
    with mariadb_database("bench_placement") as url:
        engine = create_database_engine(url)
        with engine.begin() as conn:
            conn.execute(insert(Host), [
                {"guid": str(uuid.uuid4()), "name": f"h{i}", "status": "Up", "cpus": 64,
                 "memory_mb": 262144, "hypervisor_version": ""} for i in range(hosts)])
            ids = list(conn.scalars(select(Host.id).order_by(Host.id)))
            rows: list[dict[str, Any]] = []
            for index, host_id in enumerate(ids):
                state = "allocated" if index < hosts // 2 else "free"
                for d in range(DEVICES_PER_HOST):
                    rows.append({"host_id": host_id, "name": "10GE", "domain": "0000",
                                 "bus": f"{d // 8:02x}", "slot": "00", "function": str(d % 8),
                                 "state": state})
                if len(rows) >= 20000:
                    conn.execute(insert(PciDevice), rows)
                    rows = []
            if rows:
                conn.execute(insert(PciDevice), rows)
            conn.exec_driver_sql("ANALYZE TABLE op_host_pci_devices, hosts")
        demand = planner.Demand(cpus=2, memory_mb=1024, pci=(PciRequest(name="10GE", count=2),))
        times = []
        with Session(engine) as session:
            for _ in range(samples):
                began = time.perf_counter()
                found = planner.find_hosts(session, demand)
                times.append((time.perf_counter() - began) * 1000)
                session.rollback()
        assert found and found[0].name == f"h{hosts // 2}", found
        engine.dispose()
        return statistics.median(times)


def main() -> None:
    """Runs the benchmarks and prints the table and metric lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=300)
    parser.add_argument("--daemons", type=int, default=2,
                        help="management daemons sharing the queues and the database")
    args = parser.parse_args()
    configure_logging("warning")
    vms = min(args.vms, HOSTS * DEVICES_PER_HOST)
    rate = bench_deploys(vms, args.daemons)
    rate_1 = rate if args.daemons == 1 else bench_deploys(vms, 1)
    p1k = bench_placement(1000)
    p10k = bench_placement(10000)
    print(f"{'figure':<38}{'value':>10}  unit")
    print(f"{f'deploys end to end (20 hosts, {args.daemons} mgmt)':<38}{rate:>10.1f}  1/s")
    print(f"{'deploys end to end (20 hosts, 1 mgmt)':<38}{rate_1:>10.1f}  1/s")
    print(f"{'placement p50, 1,000 hosts':<38}{p1k:>10.2f}  ms")
    print(f"{'placement p50, 10,000 hosts':<38}{p10k:>10.2f}  ms")
    print(f"metric=deploys_per_s value={rate:.1f} unit=1/s")
    print(f"metric=deploys_per_s_1_mgmt value={rate_1:.1f} unit=1/s")
    print(f"metric=placement_p50_ms_1000_hosts value={p1k:.2f} unit=ms")
    print(f"metric=placement_p50_ms_10000_hosts value={p10k:.2f} unit=ms")


if __name__ == "__main__":
    main()
