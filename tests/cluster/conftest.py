"""Fixtures of the cluster tests: three-node RabbitMQ and Galera clusters, and stacks on them.

The clusters (tests/support/clusters.py) are started once per session, on
first use, and stopped at its end; a test that stops a node calls
``ensure_running`` first, so every test starts on three nodes. A missing
package or a taken port fails the tests with what to do.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.support.clusters import GaleraCluster, RabbitCluster, exclusive
from tests.support.e2e_stack import Stack


@pytest.fixture(scope="session")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    """Three clustered RabbitMQ nodes (hostdev-t1..3@localhost, ports 5681-5683)."""
    with exclusive("rabbit"):
        cluster = RabbitCluster()
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="session")
def galera_cluster() -> Iterator[GaleraCluster]:
    """Three MariaDB Galera nodes (ports 3311-3313)."""
    with exclusive("galera"):
        cluster = GaleraCluster()
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


@contextmanager
def running_stack(vhost: object, db_url: str, work: Path,
                  mgmt_properties: Mapping[str, str]) -> Iterator[Stack]:
    """Yields a ``Stack`` on a vhost and database made elsewhere; stops its processes after."""
    with ExitStack() as cleanup:
        stack = Stack(vhost, db_url, work, mgmt_properties)  # type: ignore[arg-type]
        cleanup.callback(stack.close)
        yield stack
