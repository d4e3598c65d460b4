"""The broker's node that leads the quorum queues stops during a burst of deploys and stops.

Two ``hostdev-mgmt`` daemons and four ``hostdev-agent`` processes (simulated
hosts) run on a three-node RabbitMQ cluster, every one of them with the
cluster's three URLs, node 1 first, in ``amqp.url``: they all connect to
node 1, so node 1 leads every quorum queue. The database is the machine's
MariaDB (the broker is what fails here). Sixteen clients each deploy VMs
and stop them again; when 100 of the requests were accepted, node 1 stops.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import pairwise

import pytest

from hostdev.messages import api
from tests.cluster.conftest import running_stack
from tests.support.cluster_burst import Burst, run_burst
from tests.support.clusters import ClusterVhost, RabbitCluster, cluster_vhost
from tests.support.databases import mariadb_database
from tests.support.e2e_stack import FAST_MGMT, Stack
from tests.support.processes import Daemon, record_time

pytestmark = [pytest.mark.cluster, pytest.mark.mariadb, pytest.mark.libvirt, pytest.mark.slow]

#: VMs deployed then stopped: twice as many requests (the burst).
VMS = 250
HOSTS = 4
DEVICES = 64  # per host: every VM holds one 10GE device
#: Hosts stay Up and jobs alive through a failover of a few seconds.
PROPERTIES = {**FAST_MGMT, "amqp.queue.type": "quorum", "ping.interval": "5s",
              "host.disconnected.timeout": "60s", "host.down.timeout": "120s",
              "job.start.timeout": "60s", "job.stop.timeout": "60s"}


@pytest.fixture(scope="module")
def cluster_stack(rabbit_cluster: RabbitCluster,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, ClusterVhost]]:
    """Two daemons and four hosts on the broker cluster; offering one10ge."""
    rabbit_cluster.ensure_running()
    with cluster_vhost(rabbit_cluster, "failover") as vhost, \
            mariadb_database("hostdev_cluster") as db_url, \
            running_stack(vhost, db_url, tmp_path_factory.mktemp("broker"), PROPERTIES) as stack:
        stack.start_mgmt()
        stack.start_mgmt()
        for n in range(HOSTS):
            stack.start_host(f"bf-{n}", {"10GE": DEVICES}, cpus=512, memory_mb=1 << 20,
                             ping="5s")
        stack.wait_hosts_up()
        stack.request(api.CreateOfferingRequest(name="one10ge", cpus=1, memory_mb=256,
                                                pci_devices="10GE"))
        yield stack, vhost


def _reconnections(daemon: Daemon, lost_port: int) -> list[float]:
    """Seconds from each lost connection to the next one opened elsewhere, from the JSON log."""
    gaps: list[float] = []
    lost_at = None
    for record in daemon.records():
        event = record.get("event")
        if event == "bus_connection_lost" and lost_at is None:
            lost_at = record_time(record)
        elif event == "bus_connected" and lost_at is not None \
                and f":{lost_port}/" not in str(record.get("url")):
            gaps.append(record_time(record) - lost_at)
            lost_at = None
    return gaps


def test_leader_node_stops_mid_burst(rabbit_cluster: RabbitCluster,
                                     cluster_stack: tuple[Stack, ClusterVhost]) -> None:
    """Stopping the quorum queues' leader mid-burst loses no accepted job; all fail over."""
    stack, vhost = cluster_stack
    leader = rabbit_cluster.nodes[0]
    leaders = rabbit_cluster.leaders(vhost.name)
    assert {"hostdev.mgmt", "hostdev.api"} <= set(leaders), leaders
    assert set(leaders.values()) == {leader.name}, leaders

    items = [[api.DeployVmRequest(name=f"bf{n}", offering="one10ge"),
              api.StopVmRequest(vm=f"bf{n}")] for n in range(VMS)]
    burst: Burst = run_burst(vhost.url, items, at=(100, leader.stop))

    assert burst.action_error == ""
    assert burst.failures() == []
    assert len(burst.jobs()) == 2 * VMS
    assert stack.sql("SELECT id, kind, state FROM jobs "
                     "WHERE state NOT IN ('succeeded', 'failed')") == []
    states = stack.sql("SELECT state, COUNT(*) AS n FROM vm_instances GROUP BY state")
    assert states == [{"state": "Stopped", "n": VMS}]
    assert not [uuid for host in stack.hosts.values()
                for uuid, (_, running, _) in host.domains().items() if running]
    assert not stack.sql("SELECT id FROM op_host_pci_devices WHERE instance_id IS NOT NULL")
    # Every daemon and agent lost node 1 and connected to another node of its list.
    gaps = {d.name: _reconnections(d, leader.port)
            for d in [*stack.mgmts, *(h.daemon for h in stack.hosts.values())]}
    assert all(gaps.values()), gaps
    assert all(h.running for h in stack.hosts.values())
    assert all(d.running for d in stack.mgmts)

    after = stack.request(api.DeployVmRequest(name="after-burst", offering="one10ge"))
    assert isinstance(after, api.JobAccepted)
    assert stack.wait_job(after.job_id).state == "succeeded"
    back = max(record_time(r) for d in [*stack.mgmts, *(h.daemon for h in stack.hosts.values())]
               for r in d.records() if r.get("event") == "bus_connected") - burst.action_wall
    accepted = sorted(o.accepted_at for o in burst.outcomes if o.accepted_at)
    print(f"\nbroker failover: {2 * VMS} requests in {burst.seconds:.1f} s "
          f"({2 * VMS / burst.seconds:.0f}/s); node stop took "
          f"{burst.action_done - burst.action_started:.1f} s; every process reconnected "
          f"{back:.1f} s after the stop began; reconnect after loss: max "
          f"{max(max(g) for g in gaps.values()):.2f} s; longest pause between accepted "
          f"requests: {max(b - a for a, b in pairwise(accepted)):.2f} s;"
          f" at {time.strftime('%H:%M:%S')}")
