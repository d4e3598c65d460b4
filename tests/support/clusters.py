"""Three-node RabbitMQ and MariaDB Galera clusters of their own, beside the machine's services.

An operator scales hostdev out on a clustered broker and a Galera cluster;
the ``cluster`` tests run hostdev on both, started and stopped here:

- ``RabbitCluster``: nodes ``hostdev-tN@localhost`` on AMQP ports 5681-5683
  (distribution 25681-25683), run by Debian's ``rabbitmq-server`` script with
  the machine's Erlang cookie, joined with ``rabbitmqctl join_cluster``;
- ``GaleraCluster``: ``mariadbd`` processes on ports 3311-3313 (group
  communication 4577/4587/4597, IST 4578..., SST 4579... by rsync), the
  first bootstrapping the cluster with ``--wsrep-new-cluster``.

Neither ever touches the machine's own RabbitMQ (``rabbit@...``, 5672) or
MariaDB (3306, /run/mysqld): the node names, ports, folders and processes
are their own. Everything lives under ``/var/tmp/hostdev-cluster`` (the
``rabbitmq`` and ``mysql`` users must reach it), wiped at each start; a
lock file keeps two test runs from sharing the ports, and nodes a killed
run left behind are stopped first (by their node names and pid files).
Something missing (a package, a free port) fails with what to do.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pymysql

from hostdev.mgmt.persistence.database import upgrade
from tests.support.rabbitmq import rabbitmqctl
from tests.support.waiting import wait_for

ROOT: Final = Path(os.environ.get("HOSTDEV_CLUSTER_DIR", "/var/tmp/hostdev-cluster"))
HOST: Final = "127.0.0.1"
RABBIT_PORTS: Final = (5681, 5682, 5683)
GALERA_PORTS: Final = (3311, 3312, 3313)
GALERA_PROVIDER: Final = Path("/usr/lib/galera/libgalera_smm.so")
#: The Debian packages each cluster needs, and a file that shows each is installed.
RABBIT_NEEDS: Final = {"rabbitmq-server": Path("/usr/sbin/rabbitmq-server")}
GALERA_NEEDS: Final = {"mariadb-server": Path("/usr/sbin/mariadbd"), "galera-4": GALERA_PROVIDER,
                       "rsync": Path("/usr/bin/rsync")}


def require_packages(needs: dict[str, Path]) -> None:
    """Installs the Debian packages whose files are missing (as ``make setup`` does)."""
    missing = [package for package, path in needs.items() if not path.exists()]
    if not missing:
        return
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in ([*sudo, "apt-get", "update", "-qq"],
                 [*sudo, "apt-get", "install", "-y", "-qq", *missing]):
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the cluster tests need {' '.join(missing)}: `{' '.join(argv)}` "
                               f"failed: {done.stderr.strip()[-500:]}; install them by hand")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def require_free_ports(ports: list[int], what: str) -> None:
    """Fails naming the ports something else listens on."""
    taken = [port for port in ports if not _port_free(port)]
    if taken:
        raise RuntimeError(f"{what} needs ports {taken} on {HOST}, which are in use: stop what "
                           "listens there (`ss -ltnp`) and run the tests again")


@contextmanager
def exclusive(name: str, timeout: float = 900.0) -> Iterator[None]:
    """Holds ``ROOT/<name>.lock`` so only one test run uses a cluster's ports at a time."""
    ROOT.mkdir(parents=True, exist_ok=True)
    with open(ROOT / f"{name}.lock", "w") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another test run holds {lock.name} for over "
                                       f"{timeout:.0f} s") from None
                time.sleep(1.0)  # another run's cluster: its own process releases it
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- RabbitMQ ----------------------------------------------------------------------------


@dataclass
class RabbitNode:
    """One RabbitMQ node of the cluster: its name, AMQP port and folder."""

    index: int
    port: int
    folder: Path

    @property
    def name(self) -> str:
        """The Erlang node name (``hostdev-tN@localhost``)."""
        return f"hostdev-t{self.index}@localhost"

    @property
    def url(self) -> str:
        """AMQP URL of the node's default vhost as guest."""
        return f"amqp://guest:guest@{HOST}:{self.port}/"

    def ctl(self, *args: str) -> str:
        """Runs ``rabbitmqctl -n NODE ARGS``."""
        return rabbitmqctl("-n", self.name, *args)

    def running(self) -> bool:
        """True when the node answers ``rabbitmqctl status``."""
        try:
            self.ctl("status")
        except RuntimeError:
            return False
        return True

    def start(self) -> None:
        """Starts the node detached (it rejoins its cluster if it was in one)."""
        env = {**os.environ, "RABBITMQ_NODENAME": self.name,
               "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.port + 20000),
               "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq.conf"),
               "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
               "RABBITMQ_LOG_BASE": str(self.folder / "log"),
               "RABBITMQ_PID_FILE": str(self.folder / "pid"),
               "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "plugins"),
               "RABBITMQ_ENABLED_PLUGINS": ""}
        done = subprocess.run(["rabbitmq-server", "-detached"], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmq-server {self.name} failed: {done.stderr or done.stdout}")
        # -detached returns before the node registers with epmd: wait for that first.
        wait_for(lambda: self.ctl("ping") is not None, timeout=120, interval=0.5,
                 what=f"RabbitMQ node {self.name} to answer")
        self.ctl("await_startup", "--timeout", "120")

    def stop(self) -> None:
        """Stops the node (``rabbitmqctl stop``): its clients lose their connections."""
        self.ctl("stop")


class RabbitCluster:
    """Three RabbitMQ nodes clustered; ``url`` lists all three for failover."""

    def __init__(self) -> None:
        folder = ROOT / "rabbit"
        self.nodes = [RabbitNode(i + 1, port, folder / f"n{i + 1}")
                      for i, port in enumerate(RABBIT_PORTS)]

    def url(self, vhost: str, first: int = 0) -> str:
        """The ``;``-separated URLs of ``vhost`` on every node, node ``first`` first."""
        order = self.nodes[first:] + self.nodes[:first]
        return ";".join(f"amqp://guest:guest@{HOST}:{n.port}/{vhost}" for n in order)

    def start(self) -> None:
        """Wipes the folders, starts three nodes and joins nodes 2 and 3 to node 1."""
        require_packages(RABBIT_NEEDS)
        self.stop()
        require_free_ports([p for n in self.nodes for p in (n.port, n.port + 20000)],
                           "the RabbitMQ cluster")
        shutil.rmtree(ROOT / "rabbit", ignore_errors=True)
        for node in self.nodes:
            node.folder.mkdir(parents=True)
            (node.folder / "rabbitmq.conf").write_text(
                f"listeners.tcp.local = {HOST}:{node.port}\nloopback_users = none\n")
        shutil.chown(ROOT / "rabbit", "rabbitmq", "rabbitmq")
        for path in (ROOT / "rabbit").rglob("*"):
            shutil.chown(path, "rabbitmq", "rabbitmq")
        for node in self.nodes:
            node.start()
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", self.nodes[0].name)
            node.ctl("start_app")

    def ensure_running(self) -> None:
        """Starts again any node a test stopped, and waits until the cluster has all three."""
        for node in self.nodes:
            if not node.running():
                node.start()
        wait_for(lambda: len(self.running_nodes()) == len(self.nodes), timeout=120,
                 what="three running RabbitMQ nodes")

    def running_nodes(self) -> list[str]:
        """The cluster's running nodes, as node 1 sees them."""
        status = json.loads(self.nodes[0].ctl("cluster_status", "--formatter", "json"))
        return list(status["running_nodes"])

    def add_vhost(self, name: str) -> None:
        """Creates a vhost (with every permission for guest) on the cluster."""
        self.nodes[0].ctl("add_vhost", name)
        self.nodes[0].ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")

    def leaders(self, vhost: str) -> dict[str, str]:
        """Returns each quorum queue of ``vhost`` -> the node leading it."""
        node = next(n for n in self.nodes if n.running())
        out = node.ctl("list_queues", "--silent", "-p", vhost, "name", "type", "leader")
        found = {}
        for line in out.splitlines():
            name, kind, leader = [*line.split("\t"), "", ""][:3]
            if kind == "quorum":
                found[name] = leader
        return found

    def stop(self) -> None:
        """Stops every node of this cluster that runs (never another node)."""
        for node in self.nodes:
            if node.running():
                node.stop()


@dataclass(frozen=True)
class ClusterVhost:
    """A vhost on the cluster: its name and the URL list of it on every node."""

    name: str
    url: str


@contextmanager
def cluster_vhost(cluster: RabbitCluster, prefix: str) -> Iterator[ClusterVhost]:
    """Creates ``hostdev-<prefix>-<random>`` on the cluster (node 1 first in ``url``)."""
    name = f"hostdev-{prefix}-{secrets.token_hex(4)}"
    cluster.add_vhost(name)
    try:
        yield ClusterVhost(name, cluster.url(name))
    finally:
        node = next((n for n in cluster.nodes if n.running()), None)
        if node is not None:
            node.ctl("delete_vhost", name)


# -- MariaDB Galera ------------------------------------------------------------------------


@contextmanager
def galera_database(cluster: GaleraCluster, prefix: str) -> Iterator[str]:
    """Creates and migrates ``<prefix>_<random>`` on the cluster; yields its name."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    cluster.create_database(name)
    try:
        upgrade(cluster.url(name))
        yield name
    finally:
        node = next((n for n in cluster.nodes if n.running), None)
        if node is not None:
            with node.connect() as conn, conn.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")


@dataclass
class GaleraNode:
    """One ``mariadbd`` of the Galera cluster: its port, folder and process."""

    index: int
    port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        """The node's my.cnf."""
        return self.folder / "my.cnf"

    def url(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` on this node, as root over TCP."""
        return f"mysql+pymysql://root@{HOST}:{self.port}/{database}"

    def connect(self, database: str | None = None) -> pymysql.connections.Connection[Any]:
        """Opens an autocommit connection to this node as root."""
        return pymysql.connect(host=HOST, port=self.port, user="root", database=database,
                               autocommit=True, connect_timeout=5,
                               cursorclass=pymysql.cursors.DictCursor)

    def status(self, name: str) -> str | None:
        """Returns one ``SHOW STATUS`` value (``wsrep_cluster_size``...), None if unreachable."""
        try:
            with self.connect() as conn, conn.cursor() as cursor:
                cursor.execute("SHOW STATUS LIKE %s", (name,))
                row = cursor.fetchone()
        except pymysql.MySQLError:
            return None
        return str(row["Value"]) if row else None

    @property
    def running(self) -> bool:
        """True while the node's process runs."""
        return self.process is not None and self.process.poll() is None

    def start(self, *, bootstrap: bool = False) -> None:
        """Starts ``mariadbd`` and waits until the node is Synced with its cluster."""
        argv = ["mariadbd", f"--defaults-file={self.config}", "--user=mysql"]
        if bootstrap:
            argv.append("--wsrep-new-cluster")
        with open(self.folder / "stdout.log", "ab") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

        def synced() -> bool:
            if not self.running:
                log = (self.folder / "error.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"Galera node {self.index} exited:\n{log}")
            return self.status("wsrep_local_state_comment") == "Synced"
        wait_for(synced, timeout=180, interval=0.5, what=f"Galera node {self.index} Synced")

    def stop(self) -> None:
        """Shuts the node down (SIGTERM) and waits: its clients lose their connections."""
        if self.process is not None and self.running:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=120)
        self.process = None


class GaleraCluster:
    """Three MariaDB Galera nodes; ``url`` lists them for a daemon's failover."""

    def __init__(self) -> None:
        folder = ROOT / "galera"
        self.nodes = [GaleraNode(i + 1, port, folder / f"n{i + 1}")
                      for i, port in enumerate(GALERA_PORTS)]

    def url(self, database: str, first: int = 0) -> str:
        """The ``;``-separated URLs of ``database`` on every node, node ``first`` first."""
        order = self.nodes[first:] + self.nodes[:first]
        return ";".join(node.url(database) for node in order)

    def _write_config(self, node: GaleraNode) -> None:
        gcomm = ",".join(f"{HOST}:{4567 + 10 * n.index}" for n in self.nodes)
        base = 4567 + 10 * node.index
        node.config.write_text(f"""[mysqld]
datadir={node.folder / 'data'}
socket={node.folder / 'mysqld.sock'}
pid-file={node.folder / 'mysqld.pid'}
log-error={node.folder / 'error.log'}
port={node.port}
bind-address={HOST}
skip-name-resolve
innodb_buffer_pool_size=64M
innodb_flush_log_at_trx_commit=2
binlog_format=ROW
innodb_autoinc_lock_mode=2
wsrep_on=ON
wsrep_provider={GALERA_PROVIDER}
wsrep_cluster_name=hostdev-test
wsrep_cluster_address=gcomm://{gcomm}
wsrep_node_address={HOST}:{base}
wsrep_provider_options=ist.recv_addr={HOST}:{base + 1};gcache.size=64M
wsrep_sst_receive_address={HOST}:{base + 2}
wsrep_sst_method=rsync
""")

    def _ports(self) -> list[int]:
        return [p for n in self.nodes
                for p in (n.port, 4567 + 10 * n.index, 4568 + 10 * n.index, 4569 + 10 * n.index)]

    def start(self) -> None:
        """Wipes the folders, creates three data folders and starts the nodes one by one."""
        require_packages(GALERA_NEEDS)
        self._kill_leftovers()
        require_free_ports(self._ports(), "the Galera cluster")
        shutil.rmtree(ROOT / "galera", ignore_errors=True)
        for node in self.nodes:
            node.folder.mkdir(parents=True)
            self._write_config(node)
            done = subprocess.run(
                ["mariadb-install-db", f"--defaults-file={node.config}", "--user=mysql",
                 "--auth-root-authentication-method=normal", "--skip-test-db"],
                capture_output=True, text=True, timeout=300, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"mariadb-install-db for Galera node {node.index} failed: "
                                   f"{done.stderr.strip()[-800:]}")
        for path in [ROOT / "galera", *(ROOT / "galera").rglob("*")]:
            shutil.chown(path, "mysql", "mysql")
        for node in self.nodes:
            node.start(bootstrap=node is self.nodes[0])

    def _kill_leftovers(self) -> None:
        """Stops the nodes a killed test run left running (found by their pid files)."""
        for node in self.nodes:
            pid_file = node.folder / "mysqld.pid"
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(), timeout=120,
                     what=f"leftover Galera node {node.index} (pid {pid}) to exit")

    def ensure_running(self) -> None:
        """Starts again any node a test stopped; waits until the cluster has three nodes."""
        for node in self.nodes:
            if not node.running:
                node.start()
        wait_for(lambda: all(n.status("wsrep_cluster_size") == "3" for n in self.nodes),
                 timeout=120, what="a Galera cluster of three")

    def create_database(self, name: str) -> None:
        """Creates a database (utf8mb4, binary collation); Galera replicates it."""
        with self.nodes[0].connect() as conn, conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 "
                           "COLLATE utf8mb4_bin")

    def agree(self, database: str, query: str) -> list[list[dict[str, Any]]]:
        """Runs ``query`` on every running node after its replication caught up.

        ``wsrep_sync_wait`` makes each node apply what the cluster committed
        before it reads (a causal read); returns each node's rows.
        """
        found = []
        for node in self.nodes:
            if not node.running:
                continue
            with node.connect(database) as conn, conn.cursor() as cursor:
                cursor.execute("SET SESSION wsrep_sync_wait = 1")
                cursor.execute(query)
                found.append(list(cursor.fetchall()))
        return found

    def stop(self) -> None:
        """Shuts every node down, the bootstrap node last."""
        for node in reversed(self.nodes):
            node.stop()
