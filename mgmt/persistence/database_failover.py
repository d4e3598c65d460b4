"""Database failures: several nodes behind one ``db.url``, and the errors worth a retry.

``db.url`` may list MariaDB/MySQL URLs separated by ``;`` (the nodes of a
Galera cluster, this daemon's preferred node first). The engine is built on
the first; each NEW connection is opened on the node the last one reached and,
if that node does not answer, on the next ones in the list, round-robin. A
node that stops takes the connections on it down: the transaction in flight
fails with "lost connection", :func:`~hostdev.mgmt.persistence.database.run_in_transaction`
retries it in a new transaction, and that one connects to the next node.
A node that answers "WSREP has not yet prepared node for application use"
(error 1047: it is leaving the cluster, or cut off from its majority) is
treated the same: its connection is dropped and the next node is preferred.
SQLite takes one URL.

Causal reads: on a Galera node (``wsrep_on``), every connection sets
``wsrep_sync_wait = 7`` (reads, updates and deletes, inserts), so each
transaction first applies what the cluster already committed. Without it a
daemon on node 2 may not yet see the job a daemon on node 3 has just created
and answered for ("job 206 does not exist"), most of all while a node leaves
the cluster. Reads alone (1) do not do: Galera waits before the FIRST
statement of a transaction only, and a unit of work begins with an INSERT
(the handled message's id). Other servers are left as they are.

The counters (prometheus-client's default registry):

- ``hostdev_db_failovers_total``: connections opened on another node than the
  previous one (the preferred node stopped answering);
- ``hostdev_db_transactions_retried_total{reason}``: transactions run again in
  a new transaction, because of a lost race or a deadlock (``conflict``,
  which on Galera includes certification conflicts), a lost connection
  (``connection``) or a busy SQLite file (``busy``).
"""

from __future__ import annotations

import threading
from typing import Any, Final

import pymysql
import structlog
from prometheus_client import Counter
from sqlalchemy import Engine, event, make_url
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, OperationalError

log = structlog.get_logger()

#: Separates the nodes' URLs in ``db.url``.
URL_SEPARATOR: Final = ";"
# MariaDB/MySQL error codes worth a new transaction: lock wait timeout,
# deadlock, server gone away, lost connection.
_RETRYABLE_MYSQL_CODES: Final = frozenset({1205, 1213, 2006, 2013})
# Of those, the ones that mean a lost race (on Galera, 1213 is also a
# certification conflict with a transaction committed on another node).
_CONFLICT_MYSQL_CODES: Final = frozenset({1205, 1213})
# Galera: the node is not part of the primary component (leaving, joining, cut off).
_NODE_UNREADY: Final = 1047

DB_FAILOVERS = Counter(
    "hostdev_db_failovers", "Database connections opened on another node than the last one.")
TRANSACTIONS_RETRIED = Counter(
    "hostdev_db_transactions_retried", "Transactions run again in a new transaction, by reason "
    "(conflict, connection, busy).", ["reason"])


def driver_retry_reason(exc: DBAPIError) -> str | None:
    """Names why a driver error asks for a new transaction (``conflict``, ``connection``,
    ``busy``); None when it does not."""
    if exc.connection_invalidated:
        return "connection"
    code = _code(exc.orig)
    if code in _RETRYABLE_MYSQL_CODES:
        return "conflict" if code in _CONFLICT_MYSQL_CODES else "connection"
    if isinstance(exc, OperationalError) and "database is locked" in str(exc.orig):
        return "busy"
    return None


def split_urls(url: str) -> list[str]:
    """Returns the URLs a ``db.url`` value lists (one for a plain URL)."""
    return [part.strip() for part in url.split(URL_SEPARATOR) if part.strip()] or [url]


def first_url(url: str) -> str:
    """Returns the first URL of a ``db.url`` value: the one its dialect and schema come from."""
    return split_urls(url)[0]


def safe_urls(url: str) -> str:
    """Returns the URL(s) with passwords hidden, for logs and error texts."""
    return URL_SEPARATOR.join(make_url(part).render_as_string() for part in split_urls(url))


def _code(exc: BaseException | None) -> int | None:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


class NodeList:
    """Opens each new DBAPI connection on the node that answered last, else the next ones."""

    def __init__(self, urls: list[str], dialect: Dialect) -> None:
        self._nodes = []
        for url in urls:
            parsed = make_url(url)
            cargs, cparams = dialect.create_connect_args(parsed)
            self._nodes.append((parsed.render_as_string(), list(cargs), dict(cparams)))
        self._current = 0  # where the next connection goes first
        self._connected = 0  # where the last one went
        self._lock = threading.Lock()
        self._is_disconnect = dialect.is_disconnect

    def is_disconnect(self, error: Any, connection: Any, cursor: Any) -> bool:
        """The dialect's test, plus a Galera node that is not ready (its node is left)."""
        if self._is_disconnect(error, connection, cursor):
            return True
        if _code(error) != _NODE_UNREADY:
            return False
        # The DBAPI connection (or the pool's proxy of it) knows where it is connected.
        where = (getattr(connection, "host", None), getattr(connection, "port", None))
        with self._lock:
            name, _, cparams = self._nodes[self._current]
            if where in ((None, None), (cparams.get("host"), cparams.get("port"))):
                self._current = (self._current + 1) % len(self._nodes)
        log.warning("database_node_unready", node=name, error=str(error))
        return True

    def connect(self, dialect: Dialect, _record: Any, _cargs: Any, _cparams: Any) -> Any:
        """The engine's ``do_connect`` hook: returns a DBAPI connection to the first node up.

        Raises:
            the DBAPI error of the last node tried, when none answered.
        """
        with self._lock:
            start = self._current
        error: Exception | None = None
        for step in range(len(self._nodes)):
            index = (start + step) % len(self._nodes)
            name, cargs, cparams = self._nodes[index]
            try:
                connection = dialect.loaded_dbapi.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.Error as exc:
                error = exc
                log.warning("database_node_unreachable", node=name, error=str(exc))
                continue
            with self._lock:
                moved = self._connected != index
                self._current = self._connected = index
            if moved:
                DB_FAILOVERS.inc()
                log.warning("database_failover", node=name)
            return connection
        assert error is not None
        raise error


def install_node_list(engine: Engine, urls: list[str]) -> None:
    """Makes ``engine`` open its connections through a :class:`NodeList` of ``urls``.

    The dialect's disconnect test is extended on this engine's dialect only
    (Core and ``PreparedStatement`` both ask it): a connection to a node that
    is not ready is invalidated, so the retry opens one elsewhere.
    """
    nodes = NodeList(urls, engine.dialect)
    event.listen(engine, "do_connect", nodes.connect)
    setattr(engine.dialect, "is_disconnect", nodes.is_disconnect)  # noqa: B010


def install_causal_reads(engine: Engine) -> None:
    """Makes each new connection of ``engine`` on a Galera node read causally (see above)."""
    event.listen(engine, "connect", _causal_reads)


def _causal_reads(dbapi_connection: Any, _record: object) -> None:
    with dbapi_connection.cursor() as cursor:
        try:
            cursor.execute("SELECT @@wsrep_on")
        except pymysql.MySQLError:  # a server without Galera support has no such variable
            return
        row = cursor.fetchone()
        if row is not None and row[0] in (1, "1", "ON"):
            cursor.execute("SET SESSION wsrep_sync_wait = 7")
