"""Benchmarks deploys end to end and the placement query, on the real broker and MariaDB.

- ``deploys_per_s``: VMs deployed per second by ONE management daemon, from
  the first ``DeployVmRequest`` to the last ``vm.<uuid>.Running`` event, as
  shipped: ``hostdev-mgmt run`` with its defaults (quorum queues, JSON logs
  at info, here to a file), and 20 simulated hosts, each run by the agent's
  own ``Agent`` (command handlers on a ``SimulatedHost``, its own bus
  connection and loop thread, like 20 ``hostdev-agent``; all in one child
  process, which also counts the ``vm.*.Running`` events). 16 client threads
  send the requests (16 deploys in flight). Offering: one 10GE device; 16
  per host. ``deploys_per_s_<N>_mgmt`` is the same with ``--daemons N``
  daemons sharing the queues and the database (default 2; the machine has
  two cores).
- ``stops_per_s`` (and ``stops_per_s_<N>_mgmt``): then the same VMs stopped per
  second, from the first ``StopVmRequest`` to the last ``vm.<uuid>.Stopped``
  event (every stop gives its host room back: one write of placement's block
  row, which all 20 hosts share).
- ``placement_p50_ms_<N>_hosts``: the planner's search (``find_hosts``) on
  N hosts of 16 devices each, half of them full (first fit has to skip them).

Prints a table, then ``metric=NAME value=NUMBER unit=UNIT`` lines.
Run: ``.venv/bin/python bench/deploy.py [--vms 300] [--daemons 2]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import scratch
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from hostdev.agent.config import parse_config
from hostdev.agent.daemon import Agent
from hostdev.agent.simulated import SimulatedHost
from hostdev.agent.startup_checks import check_host
from hostdev.messages import api
from hostdev.messages.bus import Bus, BusConfig
from hostdev.messages.bus.contract import EVENTS_EXCHANGE
from hostdev.messages.events import VmStateChanged
from hostdev.messages.runtime.logging import configure_logging
from hostdev.messages.values import PciRequest
from hostdev.mgmt.persistence.database import create_database_engine
from hostdev.mgmt.persistence.models import Host, PciDevice
from hostdev.mgmt.placement import blocks, planner

HOSTS = 20
DEVICES_PER_HOST = 16
CLIENTS = 16


def start_mgmt(db_url: str, amqp_url: str, folder: Path, number: int) -> subprocess.Popen[bytes]:
    """Starts ``hostdev-mgmt run`` with its defaults; its log goes to ``mgmt-<number>.log``."""
    with open(folder / f"mgmt-{number}.log", "wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "hostdev.mgmt.daemon", "run", "--db-url", db_url,
             "--amqp-url", amqp_url, "--name", f"bench-{number}"],
            stdout=log_file, stderr=subprocess.STDOUT)


def host_spec(number: int) -> dict[str, Any]:
    """The simulated host's JSON spec: 16 NICs, each alone in its IOMMU group."""
    return {"name": f"sim{number:02d}", "cpus": 64, "memory_mb": 262144,
            "devices": [{"address": f"{0x20 + d:02x}:00.0"} for d in range(DEVICES_PER_HOST)],
            "domains": []}


def agent_properties(number: int, libvirt_uri: str, amqp_url: str) -> str:
    """The host's ``agent.properties``: identity, host, broker and devices; defaults else."""
    devices = ",".join(f"{0x20 + d:02x}:00.0|10GE" for d in range(DEVICES_PER_HOST))
    return (f"guid=bench-{number:02d}\nname=sim{number:02d}\nlibvirt.uri={libvirt_uri}\n"
            f"amqp.url={amqp_url}\npci.devices={devices}\n")


class Counters:
    """Values shared with the agents' process: Running events seen, and when the last came."""

    def __init__(self, context: Any) -> None:
        self.running = context.Value("i", 0)
        self.last_running = context.Value("d", 0.0)
        self.stopped = context.Value("i", 0)
        self.last_stopped = context.Value("d", 0.0)

    def on_event(self, event: VmStateChanged, _: Any) -> None:
        """Counts a ``vm.*.Running`` or ``vm.*.Stopped`` event."""
        if event.state == "Running":
            self.running.value += 1
            self.last_running.value = time.monotonic()
        elif event.state == "Stopped":
            self.stopped.value += 1
            self.last_stopped.value = time.monotonic()


def run_agents(amqp_url: str, folder: Path, counters: Counters) -> None:
    """Child process: an ``Agent`` per simulated host on a thread each, and the event counter.

    Each agent is set up as ``hostdev-agent`` sets itself up: its
    properties parsed, its host opened and checked, its own bus connection.
    """
    log_file = open(folder / "agents.log", "a", encoding="utf-8")  # noqa: SIM115 (process-long)
    for number in range(HOSTS):
        spec = folder / f"sim{number:02d}.json"
        spec.write_text(json.dumps(host_spec(number)), encoding="utf-8")
        config = parse_config(agent_properties(number, f"simulated://{spec}", amqp_url),
                              str(folder / f"sim{number:02d}.properties"))
        if number == 0:
            configure_logging(config.log_level, stream=log_file,
                              json=config.log_format == "json")
        host = SimulatedHost(config.libvirt_uri)
        host.open()
        report = check_host(config, host.pci_devices(), host.domains(), host.pci_backends())
        if not report.ok:
            raise SystemExit(f"simulated host {number} fails its checks: {report.errors}")
        bus = Bus(BusConfig(url=config.amqp_url, queue_type=config.amqp_queue_type,
                            app_id="hostdev-agent"))
        agent = Agent(config, host, bus, report)
        threading.Thread(target=agent.run, name=config.name, daemon=True).start()
    events = Bus(BusConfig(url=amqp_url, app_id="bench-events"))
    events.connect()
    events.declare_queue("bench.events", ["vm.*.Running", "vm.*.Stopped"],
                         exchange=EVENTS_EXCHANGE)
    events.consume("bench.events", {VmStateChanged: counters.on_event})
    events.run()


def bench_deploys(vms: int, daemons: int) -> float:
    """Returns VMs deployed per second end to end by ``daemons`` management daemons."""
    return bench_deploys_and_stops(vms, daemons, stops=False)[0]


def bench_deploys_and_stops(vms: int, daemons: int, *,
                            stops: bool = True) -> tuple[float, float | None]:
    """Returns VMs deployed, then (``stops``) stopped, per second end to end by ``daemons``
    management daemons."""
    with scratch.vhost("deploy") as amqp_url, scratch.database("deploy") as db_url, \
            tempfile.TemporaryDirectory(prefix="hostdev-bench-") as directory:
        folder = Path(directory)
        mgmt = [start_mgmt(db_url, amqp_url, folder, n) for n in range(daemons)]
        context = mp.get_context("spawn")
        counters = Counters(context)
        agents = context.Process(target=run_agents, args=(amqp_url, folder, counters))

        def wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
            deadline = time.monotonic() + timeout
            while not condition():
                for process in mgmt:
                    if process.poll() is not None:
                        raise SystemExit(f"hostdev-mgmt exited with {process.returncode}:\n"
                                         + _tail(folder / f"mgmt-{mgmt.index(process)}.log"))
                if agents.exitcode is not None:
                    raise SystemExit(f"the agents exited with {agents.exitcode}:\n"
                                     + _tail(folder / "agents.log"))
                if time.monotonic() > deadline:
                    raise SystemExit(f"timed out after {timeout} s waiting for {what}")
                time.sleep(0.05)  # polling other processes

        try:
            client = Bus(BusConfig(url=amqp_url, app_id="bench"))
            wait(lambda: _hosts_up(client) is not None, 60, "management daemon")
            agents.start()
            wait(lambda: _hosts_up(client) == HOSTS, 60, f"{HOSTS} hosts Up")
            client.request(api.CreateOfferingRequest(name="one10ge", cpus=1, memory_mb=256,
                                                     pci_devices="10GE"))
            start = _send(amqp_url, [api.DeployVmRequest(name=f"vm{n}", offering="one10ge")
                                     for n in range(vms)])
            wait(lambda: counters.running.value >= vms, 120, f"{vms} VMs Running")
            deploys = vms / (counters.last_running.value - start)
            stopped = None
            if stops:
                start = _send(amqp_url, [api.StopVmRequest(vm=f"vm{n}") for n in range(vms)])
                wait(lambda: counters.stopped.value >= vms, 120, f"{vms} VMs Stopped")
                stopped = vms / (counters.last_stopped.value - start)
            client.close()
            return deploys, stopped
        finally:
            agents.terminate()
            agents.join(10)
            for process in mgmt:
                process.terminate()
            for process in mgmt:
                process.wait(15)


def _send(amqp_url: str, requests: list[Any]) -> float:
    """Sends the requests from ``CLIENTS`` client threads, each waiting for its answer (a
    JobAccepted) before the next; returns when the first was sent (``time.monotonic``)."""
    pending = iter(requests)
    lock = threading.Lock()
    errors: list[str] = []

    def loop() -> None:
        bus = Bus(BusConfig(url=amqp_url, app_id="bench"))
        while True:
            with lock:
                request = next(pending, None)
            if request is None:
                break
            answer = bus.request(request, timeout=30)
            if not isinstance(answer, api.JobAccepted):
                errors.append(str(answer))
        bus.close()

    threads = [threading.Thread(target=loop) for _ in range(CLIENTS)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"requests refused: {errors[:3]}")
    return start


def _hosts_up(client: Bus) -> int | None:
    """Returns how many hosts are Up; None while management does not answer."""
    try:
        answer = client.request(api.ListHostsRequest(), timeout=1)
    except Exception:
        return None
    if not isinstance(answer, api.HostList):
        return None
    return sum(1 for host in answer.hosts if host.status == "Up")


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no {path.name} yet: see the error above)"


def bench_placement(hosts: int, samples: int = 200) -> float:
    """Returns the p50 in ms of ``find_hosts`` over ``hosts`` hosts, the first half full."""
    with scratch.database("placement") as url:
        engine = create_database_engine(url)
        with engine.begin() as conn:
            conn.execute(insert(Host), [
                {"guid": str(uuid.uuid4()), "name": f"h{i}", "status": "Up", "cpus": 64,
                 "memory_mb": 262144, "hypervisor_version": ""} for i in range(hosts)])
            ids = list(conn.scalars(select(Host.id).order_by(Host.id)))
            # Placement's blocks, as the hosts' registrations leave them.
            blocks.raise_rows(conn, [(host_id, 64, 262144) for host_id in ids])
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
                        help="management daemons of the second deploy figure (1: none)")
    args = parser.parse_args()
    configure_logging("warning")
    vms = min(args.vms, HOSTS * DEVICES_PER_HOST)
    rate, stops = bench_deploys_and_stops(vms, 1)
    rate_n, stops_n = (bench_deploys_and_stops(vms, args.daemons) if args.daemons > 1
                       else (None, None))
    p1k = bench_placement(1000)
    p10k = bench_placement(10000)
    print(f"{'figure':<38}{'value':>10}  unit")
    print(f"{'deploys end to end (20 hosts, 1 mgmt)':<38}{rate:>10.1f}  1/s")
    if rate_n is not None:
        print(f"{f'deploys end to end (20 hosts, {args.daemons} mgmt)':<38}{rate_n:>10.1f}  1/s")
    print(f"{'stops end to end (20 hosts, 1 mgmt)':<38}{stops or 0:>10.1f}  1/s")
    if stops_n is not None:
        print(f"{f'stops end to end (20 hosts, {args.daemons} mgmt)':<38}{stops_n:>10.1f}  1/s")
    print(f"{'placement p50, 1,000 hosts':<38}{p1k:>10.2f}  ms")
    print(f"{'placement p50, 10,000 hosts':<38}{p10k:>10.2f}  ms")
    print(f"metric=deploys_per_s value={rate:.1f} unit=1/s")
    if rate_n is not None:
        print(f"metric=deploys_per_s_{args.daemons}_mgmt value={rate_n:.1f} unit=1/s")
    print(f"metric=stops_per_s value={stops or 0:.1f} unit=1/s")
    if stops_n is not None:
        print(f"metric=stops_per_s_{args.daemons}_mgmt value={stops_n:.1f} unit=1/s")
    print(f"metric=placement_p50_ms_1000_hosts value={p1k:.2f} unit=ms")
    print(f"metric=placement_p50_ms_10000_hosts value={p10k:.2f} unit=ms")


if __name__ == "__main__":
    main()
