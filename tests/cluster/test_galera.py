"""Two management daemons on different nodes of a three-node MariaDB Galera cluster.

``mgmt-1`` has ``db.url`` = node 1; node 2; node 3 and ``mgmt-2`` node 2;
node 3; node 1: each writes on its own node, and Galera certifies their
transactions against each other at commit (a conflict surfaces as a
deadlock error, which the daemons retry). Four simulated hosts of 16 10GE
devices each; the broker is the machine's RabbitMQ (the database is what
is clustered here). Sixteen clients deploy and stop VMs concurrently.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from hostdev.messages import api
from hostdev.mgmt.persistence.database import create_database_engine
from hostdev.mgmt.placement import blocks
from tests.cluster.conftest import running_stack
from tests.support.cluster_burst import run_burst
from tests.support.clusters import GaleraCluster, galera_database
from tests.support.e2e_stack import FAST_MGMT, Stack
from tests.support.processes import free_port, record_time
from tests.support.rabbitmq import amqp_vhost

pytestmark = [pytest.mark.cluster, pytest.mark.rabbitmq, pytest.mark.libvirt,
              pytest.mark.slow]

HOSTS = 4
DEVICES = 16  # per host; each VM holds one
PROPERTIES = {**FAST_MGMT, "ping.interval": "5s", "host.disconnected.timeout": "60s",
              "host.down.timeout": "120s", "job.start.timeout": "60s",
              "job.stop.timeout": "60s"}
#: Every device row with its holder, as each node has it.
DEVICE_ROWS = ("SELECT host_id, domain, bus, slot, function, state, instance_id "
               "FROM op_host_pci_devices ORDER BY host_id, domain, bus, slot, function")
VM_ROWS = "SELECT id, uuid, name, state, host_id FROM vm_instances ORDER BY id"
JOB_ROWS = "SELECT id, kind, state FROM jobs ORDER BY id"
#: Each Up host's room, and placement's blocks.
UP_HOSTS = ("SELECT id, cpus - used_cpus AS cpus, memory_mb - used_memory_mb AS memory_mb "
            "FROM hosts WHERE status = 'Up' ORDER BY id")
BLOCK_ROWS = "SELECT block, cells FROM host_blocks ORDER BY block"


class GaleraStack:
    """The stack, its database's name and each daemon's metrics port."""

    def __init__(self, stack: Stack, database: str, ports: list[int]) -> None:
        self.stack = stack
        self.database = database
        self.ports = ports

    def metric(self, daemon: int, name: str) -> float:
        """Reads one sample from a daemon's /metrics (0 when absent)."""
        url = f"http://127.0.0.1:{self.ports[daemon]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.rsplit(" ", 1)[0] == name:
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture(scope="module")
def galera_stack(galera_cluster: GaleraCluster,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[GaleraStack]:
    """Two daemons, one per Galera node (1 and 2), four hosts; offering one10ge."""
    galera_cluster.ensure_running()
    with amqp_vhost("galera") as vhost, \
            galera_database(galera_cluster, "hostdev_galera") as database, \
            running_stack(vhost, galera_cluster.url(database), tmp_path_factory.mktemp("galera"),
                          PROPERTIES) as stack:
        ports = [free_port(), free_port()]
        for first, port in enumerate(ports):
            stack.start_mgmt(properties={"db.url": galera_cluster.url(database, first),
                                         "metrics.port": str(port)})
        for n in range(HOSTS):
            stack.start_host(f"gl-{n}", {"10GE": DEVICES}, cpus=512, memory_mb=1 << 20,
                             ping="5s")
        stack.wait_hosts_up()
        stack.request(api.CreateOfferingRequest(name="one10ge", cpus=1, memory_mb=256,
                                                pci_devices="10GE"))
        yield GaleraStack(stack, database, ports)


def _check_devices(galera: GaleraCluster, g: GaleraStack) -> None:
    """Asserts every node has the same rows and no device is held twice or by a stopped VM."""
    for query in (DEVICE_ROWS, VM_ROWS, JOB_ROWS, UP_HOSTS):
        per_node = galera.agree(g.database, query)
        assert all(rows == per_node[0] for rows in per_node), query
    devices = galera.agree(g.database, DEVICE_ROWS)[0]
    vms = {vm["id"]: vm for vm in galera.agree(g.database, VM_ROWS)[0]}
    held = [d["instance_id"] for d in devices if d["instance_id"] is not None]
    assert len(held) == len(set(held)), "a VM holds two devices, or a device is held twice"
    for device in devices:
        if device["instance_id"] is not None:
            vm = vms[device["instance_id"]]
            assert (vm["state"], vm["host_id"]) == ("Running", device["host_id"]), device
    running = sum(1 for vm in vms.values() if vm["state"] == "Running")
    assert running == len(held)
    # Stops on two nodes raise the same block row: placement still skips no Up host there.
    cells = {row["block"]: int(row["cells"]) for row in galera.agree(g.database, BLOCK_ROWS)[0]}
    for host in galera.agree(g.database, UP_HOSTS)[0]:
        wanted = blocks.wanted(int(host["cpus"]), int(host["memory_mb"]))
        assert cells.get(blocks.block_of(host["id"]), 0) & wanted, host
    for host in g.stack.hosts.values():  # each domain runs with its own device
        hostdevs = [a for _, on, devs in host.domains().values() if on for a in devs]
        assert len(hostdevs) == len(set(hostdevs)), host.name


def test_two_daemons_on_two_nodes_hold_no_device_twice(
        galera_cluster: GaleraCluster, galera_stack: GaleraStack) -> None:
    """Concurrent deploys through two daemons on two Galera nodes: conflicts retried, rows agree."""
    g = galera_stack
    vms = HOSTS * DEVICES
    before = [g.metric(d, 'hostdev_db_transactions_retried_total{reason="conflict"}')
              for d in range(2)]
    burst = run_burst(g.stack.vhost.url,
                      [[api.DeployVmRequest(name=f"gl{n}", offering="one10ge")]
                       for n in range(vms)])
    assert burst.failures() == []
    conflicts = [g.metric(d, 'hostdev_db_transactions_retried_total{reason="conflict"}') - b
                 for d, b in enumerate(before)]
    _check_devices(galera_cluster, g)
    refused = g.stack.request(api.ExplainPlacementRequest(offering="one10ge"))
    assert isinstance(refused, api.PlacementExplanation)
    assert not any(v.accepted for v in refused.verdicts), "every device is held"
    assert sum(conflicts) > 0, "no certification conflict happened: the test proved nothing"
    print(f"\ngalera: {vms} deploys in {burst.seconds:.1f} s through 2 daemons; "
          f"transactions retried for conflicts: {conflicts}")


def test_a_node_stopped_mid_burst_fails_its_daemon_over(
        galera_cluster: GaleraCluster, galera_stack: GaleraStack) -> None:
    """Galera node 1 stops mid-burst: mgmt-1 moves to another node, nothing is lost."""
    g = galera_stack
    mgmt1 = g.stack.mgmts[0]
    running = [vm["name"] for vm in g.stack.sql("SELECT name FROM vm_instances "
                                                "WHERE state = 'Running'")]
    assert running, "the previous test left Running VMs to stop"
    failovers = g.metric(0, "hostdev_db_failovers_total")
    items = [[api.StopVmRequest(vm=name),
              api.DeployVmRequest(name=f"{name}-again", offering="one10ge")]
             for name in running]
    burst = run_burst(g.stack.vhost.url, items, at=(len(running) // 2,
                                                      galera_cluster.nodes[0].stop))
    assert burst.action_error == ""
    assert burst.failures() == []
    assert g.metric(0, "hostdev_db_failovers_total") == failovers + 1
    moved = mgmt1.wait_log("database_failover")
    assert ":3311/" not in moved["node"], moved
    assert mgmt1.running and g.stack.mgmts[1].running
    _check_devices(galera_cluster, g)
    assert g.stack.sql("SELECT id FROM jobs WHERE state NOT IN ('succeeded', 'failed')",
                       url=galera_cluster.nodes[1].url(g.database)) == []
    failover_s = record_time(moved) - burst.action_wall
    retried = g.metric(0, 'hostdev_db_transactions_retried_total{reason="connection"}')
    print(f"\ngalera failover: {2 * len(running)} requests in {burst.seconds:.1f} s; node stop "
          f"took {burst.action_done - burst.action_started:.1f} s; mgmt-1 on node 3312/3313 "
          f"{failover_s:.2f} s after the stop began; retried {retried:g} "
          f"transactions for the lost connection")


def test_a_transaction_that_writes_first_reads_what_another_node_committed(
        galera_cluster: GaleraCluster) -> None:
    """A row committed on node 1 is seen on node 2 by a transaction that writes first.

    A daemon's transactions begin with a write (the handled message's id) and
    then read (the job an answer names). Galera waits for the cluster only
    before the first statement of a transaction whose type is in the
    connection's ``wsrep_sync_wait``: with reads alone (1), a daemon on one
    node missed the job a daemon on another node had just committed and
    dead-lettered its answer as forged (once in a burst). Here node 2 has a
    large write set to apply each time: with 1, 38 of 100 reads missed it.
    """
    galera_cluster.ensure_running()
    with galera_database(galera_cluster, "hostdev_causal") as database:
        writer = create_database_engine(galera_cluster.nodes[0].url(database))
        reader = create_database_engine(galera_cluster.nodes[1].url(database))
        try:
            with writer.begin() as conn:
                conn.execute(text("CREATE TABLE seen (id INT PRIMARY KEY, pad TEXT)"))
                conn.execute(text("CREATE TABLE wrote (id INT PRIMARY KEY)"))
            missed: list[int] = []
            for row in range(1, 101):
                with writer.begin() as conn:
                    # With 500 rows more, node 2 takes a while to apply it.
                    conn.execute(text("INSERT INTO seen VALUES (:id, :pad)"),
                                 [{"id": row * 1000 + k, "pad": "x" * 200} for k in range(501)])
                try:
                    with reader.begin() as conn:
                        conn.execute(text("INSERT INTO wrote VALUES (:id)"), {"id": row})
                        if conn.execute(text("SELECT id FROM seen WHERE id = :id FOR UPDATE"),
                                        {"id": row * 1000 + 500}).scalar() is None:
                            missed.append(row)
                except OperationalError:  # its gap lock met the row being applied: not seen
                    missed.append(row)
            assert missed == []
        finally:
            writer.dispose()
            reader.dispose()
